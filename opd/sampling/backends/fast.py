"""A lean decode loop for Llama-family decoders: static KV cache, no `generate` machinery.

On small models (the students one distills on a CPU) Hugging Face `generate` spends most of
each decode step in Python: cache objects, mask construction, stopping criteria, output
containers. `FastBackend` runs the same arithmetic with the model's own modules (its
embeddings, norms, projections, MLPs, rotary embedding and lm_head) and a KV cache of
preallocated tensors:

    prefill:  h = embed(prompt_BP); per layer: q, k, v = proj(norm(h)); rope(q, k) at positions
              p = cumsum(mask) − 1 (left padding, as `generate`); k, v → cache[:, :, :P];
              softmax(q kᵀ · d^-½ + causal/padding mask) v → o_proj; h += mlp(norm(h))
    decode:   one new token per row per step, attending to the valid cache entries
    sampling: float32 logits of the last position through transformers' own temperature,
              top-k and top-p warpers, in `generate`'s order, then softmax and one
              `torch.multinomial` draw per row (argmax when greedy). With the same torch RNG
              state and logits equal to `generate`'s, the same tokens come out. Inside
              `opd.sampling.rows.row_seeds` each row draws from its own generator instead.

Rows that have emitted a stop token are fed the pad id until every row has stopped (as
`generate` does), then completions are cut after their first stop token.

Supported: model types llama, mistral, qwen2, qwen3 (q/k norms) without an active sliding
window or a length-dependent rope (dynamic, longrope). Anything else, and any model whose prefill logits differ from its own forward (checked
once per model on a short batch), falls back to `HFBackend`: the plain reference twin. The
tests check that both give the same tokens, greedy and sampled, on tiny models.
"""

from __future__ import annotations

import logging
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F

from opd.errors import ConfigError, ModelError
from opd.sampling.backends.base import GenerationParams
from opd.sampling.backends.hf import HFBackend, cut_at_stop, left_pad
from opd.sampling.rows import draw, row_generators
from opd.sampling.rows import warpers as _warpers

log = logging.getLogger(__name__)

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def unsupported_reason(model: torch.nn.Module, max_len: int = 0) -> str | None:
    """Why `FastBackend` cannot decode `model` (None if it can)."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        return f"model type {mtype!r} (supported: {', '.join(SUPPORTED_TYPES)})"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return f"{type(model).__name__} has no .model.layers / .model.rotary_emb"
    rope_type = getattr(inner.rotary_emb, "rope_type", "default")
    if rope_type in ("dynamic", "longrope"):  # their frequencies change with the length
        return f"rope type {rope_type!r}"
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", mtype == "mistral")
    layer_types = getattr(cfg, "layer_types", None) or ()
    if window is not None and (uses_window or "sliding_attention" in layer_types):
        if max_len == 0 or window < max_len:
            return f"sliding-window attention (window {window})"
    return None


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cat_bias(*linears, dtype=None):
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else lin.weight.new_zeros(lin.weight.shape[0])
                      for b, lin in zip(biases, linears)]).to(dtype)


def _fused(*linears, dtype=None):
    """One weight for several projections, in `dtype` (None: the weights' own)."""
    return torch.cat([lin.weight for lin in linears]).to(dtype), _cat_bias(*linears, dtype=dtype)


def _autocast_dtype(weight: torch.Tensor):
    """The dtype autocast would cast `weight` to in each matmul, or None when it would not.

    Under bf16 autocast (train.precision=bf16) the fused q/k/v and gate/up weights are made
    in bfloat16 once per rollout: autocast caches its casts only for leaf parameters, so a
    float32 fused weight would be cast again at every decode step. The values are the same
    (a cast of the concatenation is the concatenation of the casts)."""
    kind = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


class _Layer:
    """One decoder layer's weights, with q/k/v and gate/up fused into one matmul each."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        narrow = _autocast_dtype(attn.q_proj.weight)
        self.w_qkv, self.b_qkv = _fused(attn.q_proj, attn.k_proj, attn.v_proj, dtype=narrow)
        self.w_o, self.b_o = attn.o_proj.weight, attn.o_proj.bias
        self.q_norm = getattr(attn, "q_norm", None)  # qwen3 normalises q and k per head
        self.k_norm = getattr(attn, "k_norm", None)
        self.w_gate_up, self.b_gate_up = _fused(mlp.gate_proj, mlp.up_proj, dtype=narrow)
        self.w_down, self.b_down = mlp.down_proj.weight, mlp.down_proj.bias
        # SiLU (every supported family's default) without the module call
        self.act = F.silu if type(mlp.act_fn).__name__ in ("SiLUActivation", "SiLU") else mlp.act_fn
        self.norm1 = (layer.input_layernorm.weight, _eps(layer.input_layernorm))
        self.norm2 = (layer.post_attention_layernorm.weight, _eps(layer.post_attention_layernorm))


def _eps(norm) -> float:
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)


def _rms_norm(x, weight_eps):
    """transformers' Llama RMSNorm: w · x / sqrt(mean(x²) + eps), normalised in float32."""
    weight, eps = weight_eps
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class _Decoder:
    """The model's layers driven over a preallocated KV cache (B, H_kv, S_max, d) per layer."""

    def __init__(self, model, batch: int, max_len: int):
        self.inner = model.model
        p = next(model.parameters())
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        attn0 = self.inner.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.scaling = attn0.scaling
        self.layers = [_Layer(layer) for layer in self.inner.layers]
        self.final_norm = (self.inner.norm.weight, _eps(self.inner.norm))
        shape = (batch, self.n_kv, max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.valid_BS = torch.zeros((batch, max_len), dtype=torch.bool, device=p.device)
        self.length = 0  # cache entries written
        # cos / sin of every position, from the model's own rotary embedding
        pos = torch.arange(max_len, device=p.device)[None]
        cos, sin = self.inner.rotary_emb(p.new_zeros(1), pos)
        self.cos_SD, self.sin_SD = cos[0], sin[0]

    def _attention(self, lay: _Layer, i, x_BSD, cos, sin, mask_B1QK):
        B, S, _ = x_BSD.shape
        d, nq, nkv = self.head_dim, self.n_heads, self.n_kv
        qkv = F.linear(x_BSD, lay.w_qkv, lay.b_qkv).view(B, S, nq + 2 * nkv, d)
        qk, v = qkv[:, :, : nq + nkv], qkv[:, :, nq + nkv :]
        if lay.q_norm is not None:
            qk = torch.cat([lay.q_norm(qk[:, :, :nq]), lay.k_norm(qk[:, :, nq:])], dim=2)
        qk = qk * cos + _rotate_half(qk) * sin  # cos, sin: (B, S, 1, d)
        q, k = qk[:, :, :nq].transpose(1, 2), qk[:, :, nq:].transpose(1, 2)
        end = self.length + S
        self.k[i][:, :, self.length : end] = k
        self.v[i][:, :, self.length : end] = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, self.k[i][:, :, :end], self.v[i][:, :, :end], attn_mask=mask_B1QK,
            scale=self.scaling, enable_gqa=nq != nkv,
        )
        return F.linear(out.transpose(1, 2).reshape(B, S, nq * d), lay.w_o, lay.b_o)

    def forward(self, ids_BS, positions_BS, mask_B1QK):
        """Hidden states after the final norm of the new positions; appends them to the cache."""
        h = self.inner.embed_tokens(ids_BS)
        cos, sin = self.cos_SD[positions_BS][:, :, None], self.sin_SD[positions_BS][:, :, None]
        for i, lay in enumerate(self.layers):
            h = h + self._attention(lay, i, _rms_norm(h, lay.norm1), cos, sin, mask_B1QK)
            gate, up = F.linear(_rms_norm(h, lay.norm2), lay.w_gate_up, lay.b_gate_up).chunk(2, -1)
            h = h + F.linear(lay.act(gate) * up, lay.w_down, lay.b_down)
        self.length += ids_BS.shape[1]
        return _rms_norm(h, self.final_norm)

    def prefill(self, ids_BP, mask_BP):
        B, P = ids_BP.shape
        valid = mask_BP.bool()
        self.valid_BS[:, :P] = valid
        positions = (mask_BP.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones((P, P), dtype=torch.bool, device=ids_BP.device).tril()
        # A left-padding query sees no valid key; letting it see itself avoids NaNs. Its
        # output is never used (padding keys are masked for every later query).
        eye = torch.eye(P, dtype=torch.bool, device=ids_BP.device)
        mask = (causal[None] & valid[:, None, :]) | eye[None]
        return self.forward(ids_BP, positions, mask[:, None]), positions[:, -1]

    def step(self, ids_B, positions_B):
        end = self.length + 1
        self.valid_BS[:, self.length] = True
        mask = self.valid_BS[:, None, None, :end]
        return self.forward(ids_B[:, None], positions_B[:, None], mask)


# model -> why its prefill logits differ from its own forward (None: they agree). The check
# is about the architecture, not the weights, so training does not invalidate it.
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def _verify(model) -> str | None:
    """Compare prefill logits with the model's own forward on a left-padded batch."""
    head = model.get_output_embeddings()
    device = head.weight.device
    n = min(8, head.weight.shape[0])
    ids = torch.arange(n, device=device).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second row is left-padded
    was_training = model.training
    model.eval()
    try:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        dec = _Decoder(model, 2, n)
        got = head(dec.prefill(ids, mask)[0])
    finally:
        model.train(was_training)
    valid = mask.bool()
    diff = (expected[valid].float() - got[valid].float()).abs().max().item()
    tol = 1e-3 * expected[valid].abs().max().item() + 1e-5
    return None if diff <= tol else f"prefill logits differ from the model's by {diff:.2e}"


class FastBackend:
    """Batched, left-padded decoding with a static KV cache for Llama-family models.

    Args:
      batch_size: split large prompt lists into sub-batches (None = all at once).
      verify: compare the first prefill's logits of each model with its own forward pass and
        fall back to `HFBackend` on a mismatch (on by default; the check costs one forward).
      strict: raise `ModelError` instead of falling back (`sampling.backend=fast`).
    """

    def __init__(self, batch_size: int | None = None, verify: bool = True, strict: bool = False):
        self.batch_size = batch_size
        self.verify = verify
        self.strict = strict
        self.fallback = HFBackend(batch_size)

    @torch.no_grad()
    def generate(self, model, prompts: Sequence[Sequence[int]], params: GenerationParams, *,
                 pad_id: int, stop_ids: Sequence[int]) -> list[list[int]]:
        if not prompts:
            return []
        max_len = max(len(p) for p in prompts) + params.max_new_tokens
        reason = self.reason(model, max_len)
        if reason is not None:
            if self.strict:
                raise ModelError(
                    f"sampling.backend=fast cannot decode {type(model).__name__}: {reason}; "
                    "use sampling.backend=auto (falls back to Hugging Face generate) or hf"
                )
            return self.fallback.generate(model, prompts, params, pad_id=pad_id, stop_ids=stop_ids)
        step = self.batch_size or len(prompts)
        gens = row_generators(len(prompts), model.get_output_embeddings().weight.device)
        out: list[list[int]] = []
        for start in range(0, len(prompts), step):
            sub = gens[start : start + step] if gens else None
            out.extend(
                self._generate(model, prompts[start : start + step], params, pad_id, stop_ids, sub)
            )
        return out

    def reason(self, model, max_len: int = 0) -> str | None:
        """Why this backend falls back to `HFBackend` for `model` (None if it does not)."""
        reason = unsupported_reason(model, max_len)
        if reason is None and self.verify:
            if model not in _VERIFIED:  # once per model object, whichever backend asks
                _VERIFIED[model] = _verify(model)
                if _VERIFIED[model]:
                    log.warning("fast decoding disabled for %s: %s", type(model).__name__,
                                _VERIFIED[model])
            reason = _VERIFIED[model]
        return reason

    def _generate(self, model, prompts, params, pad_id, stop_ids, gens=None):
        head = model.get_output_embeddings()
        device = head.weight.device
        ids_BP, mask_BP = left_pad(prompts, pad_id)
        ids_BP, mask_BP = ids_BP.to(device), mask_BP.to(device)
        B, P = ids_BP.shape
        warpers = _warpers(params)
        stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        was_training = model.training
        model.eval()
        try:
            dec = _Decoder(model, B, P + params.max_new_tokens)
            h_BSD, pos_B = dec.prefill(ids_BP, mask_BP)
            unfinished_B = torch.ones(B, dtype=torch.bool, device=device)
            new: list[torch.Tensor] = []
            for t in range(params.max_new_tokens):
                logits_BV = head(h_BSD[:, -1]).float()
                if params.greedy:
                    next_B = logits_BV.argmax(-1)
                else:
                    scores_BV = warpers(None, logits_BV) if warpers else logits_BV
                    probs_BV = scores_BV.softmax(-1)
                    if gens is not None:  # one generator per row (opd.sampling.rows)
                        next_B = draw(probs_BV, gens)
                    else:
                        next_B = torch.multinomial(probs_BV, 1).squeeze(1)
                next_B = torch.where(unfinished_B, next_B, torch.full_like(next_B, pad_id))
                new.append(next_B)
                unfinished_B &= ~torch.isin(next_B, stops)
                if not bool(unfinished_B.any()) or t + 1 == params.max_new_tokens:
                    break
                pos_B = pos_B + 1
                h_BSD = dec.step(next_B, pos_B)
        finally:
            model.train(was_training)
        rows = torch.stack(new, 1).tolist() if new else [[] for _ in prompts]
        return [cut_at_stop(r, stop_ids) for r in rows]


BACKENDS = ("auto", "fast", "hf", "vllm")


def make_backend(name: str = "auto", batch_size: int | None = None):
    """The generation backend called `name`.

    auto: `FastBackend`, which falls back to `HFBackend` for models it does not support;
    fast: the same, but an unsupported model is an error; hf: Hugging Face `generate`;
    vllm: a vLLM engine holding a copy of the model (`opd.sampling.backends.vllm`).
    """
    if name == "hf":
        return HFBackend(batch_size)
    if name == "auto":
        return FastBackend(batch_size)
    if name == "fast":
        return FastBackend(batch_size, strict=True)
    if name == "vllm":
        from opd.sampling.backends.vllm import VLLMBackend

        return VLLMBackend()
    raise ConfigError(f"sampling.backend: {name!r} is not one of {', '.join(BACKENDS)}")
