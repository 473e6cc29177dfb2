"""An in-process stand-in for the vLLM calls `opd.sampling.backends.vllm` makes.

    LLM(model=FOLDER, skip_tokenizer_init, dtype, seed, enforce_eager,
        gpu_memory_utilization)                 loads FOLDER with transformers
    LLM.generate([{"prompt_token_ids": ids}], [SamplingParams], use_tqdm)
                                                -> [RequestOutput(outputs=[CompletionOutput(
                                                    token_ids, logprobs=[{id: Logprob}])])]
    LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": [(name, tensor)]})

Decoding is a plain full-prefix loop (no cache) in float32: greedy is argmax, sampling
draws from a `torch.Generator` seeded with the request's seed after temperature and top-k
(top-p is applied as vLLM does: the smallest set whose mass reaches p). Like vLLM, a stop
token ends a completion and is included; log-probs are the raw model's (before temperature).
Tests install it with `monkeypatch.setitem(sys.modules, "vllm", vllm_standin)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM

__version__ = "0.0-standin"


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop_token_ids: list = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    detokenize: bool = True

    def __post_init__(self):
        if self.n != 1 or self.top_k < -1 or not 0 < self.top_p <= 1:
            raise ValueError(f"stand-in: unsupported SamplingParams {self}")


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    token_ids: list
    logprobs: list | None


@dataclass
class RequestOutput:
    prompt_token_ids: list
    outputs: list


class LLM:
    """What opd uses of `vllm.LLM`; every instance is kept in `LLM.instances`."""

    instances: list = []

    def __init__(self, model: str, **kwargs):
        self.folder, self.kwargs = model, kwargs
        dtype = kwargs.get("dtype", "float32")
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
        self.model.eval()
        self.reloads = 0
        LLM.instances.append(self)

    @torch.no_grad()
    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        if method != "reload_weights":
            raise NotImplementedError(f"stand-in: collective_rpc({method!r})")
        params = self.model.state_dict()
        for name, tensor in (kwargs or {})["weights_iterator"]:
            params[name].copy_(tensor)  # an unknown name raises, as vLLM's loader does
        self.reloads += 1
        return [None]

    @torch.no_grad()
    def generate(self, prompts, sampling_params, *, use_tqdm=True):
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        return [self._one(p["prompt_token_ids"], sp) for p, sp in zip(prompts, sampling_params)]

    def _one(self, prompt, sp: SamplingParams) -> RequestOutput:
        gen = torch.Generator().manual_seed(sp.seed if sp.seed is not None else 0)
        ids, out, lps = list(prompt), [], []
        for _ in range(sp.max_tokens):
            logits_V = self.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            logp_V = logits_V.log_softmax(-1)
            tok = int(logits_V.argmax()) if sp.temperature == 0 else _sample(logits_V, sp, gen)
            out.append(tok)
            lps.append({tok: Logprob(float(logp_V[tok]), rank=1)})
            ids.append(tok)
            if tok in sp.stop_token_ids:
                break
        return RequestOutput(
            list(prompt), [CompletionOutput(out, lps if sp.logprobs is not None else None)]
        )


def _sample(logits_V, sp: SamplingParams, gen) -> int:
    scores_V = logits_V / sp.temperature
    if sp.top_k > 0:
        kth = scores_V.topk(min(sp.top_k, scores_V.numel())).values[-1]
        scores_V = scores_V.masked_fill(scores_V < kth, float("-inf"))
    probs_V = scores_V.softmax(-1)
    if sp.top_p < 1:
        sorted_p, order = probs_V.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sp.top_p
        probs_V = torch.zeros_like(probs_V).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs_V, 1, generator=gen))
