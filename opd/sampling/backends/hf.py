"""Hugging Face `generate` as a generation backend.

Left-pads the prompts, runs `model.generate` with the KV cache, and cuts each completion
after its first stop token (EOS or the chat template's end-of-turn token). Sampling draws
from torch's global RNG, so a restored RNG state reproduces the same completions; inside
`opd.sampling.rows.row_seeds` each row draws from its own generator (`RowSampler`).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList

from opd.sampling.backends.base import GenerationParams
from opd.sampling.rows import RowSampler, keep_global_rng, row_generators


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (B, P) ids and attention mask."""
    P = max(len(s) for s in seqs)
    ids_BP = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids_BP[i, P - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask_BP[i, P - len(s) :] = 1
    return ids_BP, mask_BP


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """Keep tokens up to and including the first stop token."""
    stops = set(stop_ids)
    out = []
    for t in tokens:
        out.append(int(t))
        if t in stops:
            break
    return out


class HFBackend:
    """`transformers` generation with KV cache, batched, left-padded."""

    def __init__(self, batch_size: int | None = None):
        # batch_size: split large prompt lists into sub-batches (None = all at once).
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        params: GenerationParams,
        *,
        pad_id: int,
        stop_ids: Sequence[int],
    ) -> list[list[int]]:
        if not prompts:
            return []
        step = self.batch_size or len(prompts)
        gens = row_generators(len(prompts), next(model.parameters()).device)
        out: list[list[int]] = []
        for start in range(0, len(prompts), step):
            sub = gens[start : start + step] if gens and not params.greedy else None
            out.extend(
                self._generate(model, prompts[start : start + step], params, pad_id, stop_ids, sub)
            )
        return out

    def _generate(self, model, prompts, params, pad_id, stop_ids, gens=None):
        device = next(model.parameters()).device
        ids_BP, mask_BP = left_pad(prompts, pad_id)
        cfg = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            temperature=None if params.greedy else params.temperature,
            top_p=None if params.greedy or params.top_p >= 1.0 else params.top_p,
            # 0, not None: None would fall back to transformers' default top-k of 50.
            top_k=None if params.greedy else max(0, params.top_k),
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
            use_cache=True,
        )
        was_training = model.training
        model.eval()
        try:
            # per-row generators: RowSampler picks each token; generate's own multinomial
            # (then certain) must not advance the global RNG
            procs = LogitsProcessorList([RowSampler(gens, params)]) if gens else None
            with keep_global_rng() if gens else contextlib.nullcontext():
                seqs_BL = model.generate(
                    input_ids=ids_BP.to(device),
                    attention_mask=mask_BP.to(device),
                    generation_config=cfg,
                    logits_processor=procs,
                )
        finally:
            model.train(was_training)
        new_BT = seqs_BL[:, ids_BP.shape[1] :].tolist()
        return [cut_at_stop(row, stop_ids) for row in new_BT]
