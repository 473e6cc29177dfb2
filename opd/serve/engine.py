"""The scoring engine behind `opd serve-teacher`: one padded forward for a batch of token-id
sequences, then per-position top-k log-probabilities, realised-token log-probabilities and ranks.

For a sequence x_0 .. x_{L-1} and row j (0 ≤ j < L) with logits z_j = h_j · W_VDᵀ:

    log p_j   = log_softmax(z_j / τ)                              (one teacher)
    log p_j   = logsumexp_k(log w_k + log_softmax(z_{k,j} / τ))    (ensemble, Σ w_k = 1)
    top-k_j   = the k largest entries of log p_j, ranks 1..k
    token_j   = log p_j[x_{j+1}],  rank_j = 1 + #{v : log p_j[v] > token_j}   (j < L-1)
    next      = argmax_v log p_{L-1}[v]                            (greedy next token)

Padding: sequences are padded on the RIGHT. Positions of real tokens are then the same as in
an unpadded forward (0..L-1), and under the causal mask a real token never attends to the
padding after it, so each row equals the unpadded forward's (left padding would shift the
rotary positions of every real token, equal only up to rounding). Only the N real rows are
projected, C rows at a time with C·V·K ≤ `CHUNK_ELEMENTS`: no (B·L, V) tensor is ever held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from opd.errors import ConfigError
from opd.losses.divergences import upcast
from opd.losses.mixture import check_weights
from opd.models import check_head, decoder_and_head, load_model, shared_vocab_size

CHUNK_ELEMENTS = 1 << 24  # logits entries held per chunk (64 MiB in float32), all members


@dataclass
class SequenceScores:
    """Scores of one sequence of length L (rows 0..L-2 predict tokens 1..L-1)."""

    top_ids: np.ndarray  # (L-1, k) int64, descending log-probability
    top_logprobs: np.ndarray  # (L-1, k) float32
    token_logprobs: np.ndarray  # (L-1,) float32: log p_j[x_{j+1}]
    token_ranks: np.ndarray  # (L-1,) int64: 1 + #tokens with strictly higher log-probability
    next_id: int  # greedy next token after the last one


class TeacherEngine:
    """One teacher or a mixture of teachers sharing one tokenizer, ready to score token ids."""

    def __init__(self, members: Sequence[torch.nn.Module], tokenizer, weights=None):
        self.members = list(members)
        self.tokenizer = tokenizer
        self.weights = check_weights(weights or [1.0] * len(self.members), len(self.members))
        self._log_weights = torch.tensor(self.weights, dtype=torch.float32).log()
        self._parts = []
        for model in self.members:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            decoder, head_VD, _ = decoder_and_head(model, verify=True)
            self._parts.append((decoder, head_VD))
        self.vocab_size = min(head.shape[0] for _, head in self._parts)
        self.device = self._parts[0][1].device
        positions = [getattr(m.config, "max_position_embeddings", None) for m in self.members]
        self.max_model_len = min((p for p in positions if p), default=1 << 20)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None and pad < self.vocab_size else 0)
        self.decoded = self._decode_vocab()

    @classmethod
    def load(
        cls, specs: Sequence[str], *, dtype=torch.float32, device="cpu", weights=None
    ) -> TeacherEngine:
        """Load each spec with `opd.models.load_model`; members must share one vocabulary."""
        loaded = []
        for spec in specs:
            model, tok = load_model(spec, dtype=dtype, device=device)
            check_head(model, spec)
            loaded.append((model, tok))
        first, tok = loaded[0]
        for model, mtok in loaded[1:]:
            shared_vocab_size(first, tok, model, mtok)
        if weights is not None and len(weights) != len(specs):
            raise ConfigError(f"--weights: {len(weights)} weights for {len(specs)} models")
        try:
            return cls([m for m, _ in loaded], tok, weights)
        except ValueError as err:
            raise ConfigError(f"--weights: {err}") from None

    def _decode_vocab(self) -> list[str]:
        """Each id's text as vLLM reports it in `decoded_token` (rows past the tokenizer: '')."""
        known = min(len(self.tokenizer), self.vocab_size)
        texts = self.tokenizer.batch_decode([[i] for i in range(known)])
        return texts + [""] * (self.vocab_size - known)

    @torch.inference_mode()
    def score(
        self, seqs: Sequence[Sequence[int]], temperatures: Sequence[float], k: int
    ) -> list[SequenceScores]:
        """Score each sequence (ids in [0, V), length ≥ 1) at its own temperature τ > 0."""
        lengths = [len(s) for s in seqs]
        batch, width = len(seqs), max(lengths)
        ids_BL = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask_BL = torch.zeros((batch, width), dtype=torch.long)
        targets = []
        for b, seq in enumerate(seqs):
            ids_BL[b, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask_BL[b, : len(seq)] = 1
            targets.extend(seq[1:])
            targets.append(-1)  # the last row predicts the next token: no realised one
        ids_BL, mask_BL = ids_BL.to(self.device), mask_BL.to(self.device)
        real_BL = mask_BL.bool()
        hidden = [decoder(ids_BL, mask_BL)[real_BL] for decoder, _ in self._parts]  # (N, D_k)
        temp_N = torch.repeat_interleave(
            torch.as_tensor(temperatures, dtype=torch.float32), torch.as_tensor(lengths)
        ).to(self.device)
        target_N = torch.as_tensor(targets, dtype=torch.long, device=self.device)
        out = self._rows(hidden, temp_N, target_N, k)
        return self._split(out, lengths)

    def _log_probs(self, hidden, temp_C: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """(C, V) log p rows start:end: one member's log_softmax, or the mixture's."""
        per_member = []
        for h_ND, (_, head_VD) in zip(hidden, self._parts):
            logits_CV = upcast(h_ND[start:end] @ head_VD[: self.vocab_size].T)
            per_member.append(torch.log_softmax(logits_CV / temp_C[:, None], dim=-1))
        if len(per_member) == 1:
            return per_member[0]
        log_w = self._log_weights.to(per_member[0].device)[:, None, None]
        return torch.logsumexp(torch.stack(per_member) + log_w, dim=0)

    def _rows(self, hidden, temp_N, target_N, k: int) -> dict[str, torch.Tensor]:
        n_rows = target_N.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // (self.vocab_size * (len(self._parts) + 1)))
        top_lp, top_ids, tok_lp, tok_rank, greedy = [], [], [], [], []
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            logp_CV = self._log_probs(hidden, temp_N[start:end], start, end)
            if k > 0:
                values_CK, ids_CK = logp_CV.topk(k, dim=-1)
                top_lp.append(values_CK.float().cpu())
                top_ids.append(ids_CK.cpu())
            target_C = target_N[start:end]
            chosen_C = logp_CV.gather(1, target_C.clamp(min=0)[:, None])  # (C, 1)
            tok_lp.append(chosen_C[:, 0].float().cpu())
            tok_rank.append(((logp_CV > chosen_C).sum(-1) + 1).cpu())
            greedy.append(logp_CV.argmax(-1).cpu())
            del logp_CV
        empty = torch.empty(n_rows, 0)
        return {
            "top_lp": torch.cat(top_lp) if k > 0 else empty.float(),
            "top_ids": torch.cat(top_ids) if k > 0 else empty.long(),
            "tok_lp": torch.cat(tok_lp),
            "tok_rank": torch.cat(tok_rank),
            "greedy": torch.cat(greedy),
        }

    @staticmethod
    def _split(out: dict[str, torch.Tensor], lengths: list[int]) -> list[SequenceScores]:
        arrays = {key: value.numpy() for key, value in out.items()}
        results, start = [], 0
        for length in lengths:
            last = start + length - 1  # the row after the last token: greedy next token only
            results.append(
                SequenceScores(
                    top_ids=arrays["top_ids"][start:last],
                    top_logprobs=arrays["top_lp"][start:last],
                    token_logprobs=arrays["tok_lp"][start:last],
                    token_ranks=arrays["tok_rank"][start:last],
                    next_id=int(arrays["greedy"][last]),
                )
            )
            start += length
        return results
