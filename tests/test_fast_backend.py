"""The lean decode loop (`FastBackend`) against its reference twin, Hugging Face `generate`."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from opd.errors import ConfigError, ModelError
from opd.sampling import FastBackend, GenerationParams, HFBackend, make_backend
from opd.sampling.backends.fast import _Decoder, unsupported_reason

V = 40
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)


def _build(cls, cfg_cls, seed=0, dtype=torch.float64, **kw):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(cfg_cls(**{**COMMON, **kw}))
        for p in model.parameters():  # larger weights: distinct logits, tokens that stop
            p.data.normal_(0.0, 0.3)
    return model.to(dtype).eval()


def llama(**kw):
    return _build(LlamaForCausalLM, LlamaConfig, **kw)


ARCHS = {
    "llama": lambda: llama(),
    "llama_gqa": lambda: llama(num_key_value_heads=2),
    "llama_float32": lambda: llama(dtype=torch.float32, seed=3),
    "mistral": lambda: _build(MistralForCausalLM, MistralConfig, num_key_value_heads=2,
                              sliding_window=None, seed=1),
    "qwen2_bias": lambda: _build(Qwen2ForCausalLM, Qwen2Config, num_key_value_heads=2, seed=2),
    "qwen3_qk_norm": lambda: _build(Qwen3ForCausalLM, Qwen3Config, num_key_value_heads=2,
                                    head_dim=8, seed=4),
}

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [16, 17, 18, 19, 20]]  # left padding


def _both(model, params, stop_ids=(2, 3), seed=0, prompts=PROMPTS):
    out = []
    for backend in (HFBackend(), FastBackend()):
        torch.manual_seed(seed)
        out.append(backend.generate(model, prompts, params, pad_id=0, stop_ids=stop_ids))
        out.append(torch.rand(1).item())  # RNG state after decoding
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_tokens_equal_generate(arch):
    model = ARCHS[arch]()
    assert unsupported_reason(model) is None
    stops = tuple(range(2, 12))
    hf, _, fast, _ = _both(model, GenerationParams(max_new_tokens=12, temperature=0.0), stops)
    assert fast == hf
    assert any(len(c) < 12 for c in hf), "no completion stopped: the stop path is untested"
    assert all(c[-1] in stops for c in hf if len(c) < 12)


@pytest.mark.parametrize("arch", ["llama", "llama_gqa", "qwen2_bias", "qwen3_qk_norm"])
@pytest.mark.parametrize("params", [
    GenerationParams(max_new_tokens=10, temperature=1.0),
    GenerationParams(max_new_tokens=10, temperature=0.7, top_k=5, top_p=0.8),
])
def test_sampled_tokens_equal_generate_for_the_same_rng_state(arch, params):
    model = ARCHS[arch]()
    for seed in range(3):
        hf, rng_hf, fast, rng_fast = _both(model, params, seed=seed)
        assert fast == hf
        assert rng_fast == rng_hf  # the same random numbers were consumed


def test_prefill_and_decode_logits_equal_the_models_forward():
    """Teacher-forced through the cache, every position's logits match one full forward."""
    model = llama(num_key_value_heads=2)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]])
    mask = (ids != 0).long()
    P = 4
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    head = model.get_output_embeddings()
    dec = _Decoder(model, 2, ids.shape[1])
    with torch.no_grad():
        h, pos = dec.prefill(ids[:, :P], mask[:, :P])
        got = [head(h)]
        for t in range(P, ids.shape[1]):
            pos = pos + 1
            got.append(head(dec.step(ids[:, t], pos)))
    got = torch.cat(got, 1)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-10, rtol=1e-10)


def test_rows_stop_independently_and_empty_input():
    model = llama(seed=5)
    params = GenerationParams(max_new_tokens=30, temperature=1.0)
    hf, _, fast, _ = _both(model, params, stop_ids=(2, 3, 4, 5, 6))
    assert fast == hf
    lengths = {len(c) for c in fast}
    assert len(lengths) > 1 and max(lengths) <= 30
    assert FastBackend().generate(model, [], params, pad_id=0, stop_ids=[2]) == []


def test_sub_batches_give_the_same_greedy_tokens():
    model = llama()
    params = GenerationParams(max_new_tokens=8, temperature=0.0)
    whole = FastBackend().generate(model, PROMPTS, params, pad_id=0, stop_ids=[2])
    split = FastBackend(batch_size=3).generate(model, PROMPTS, params, pad_id=0, stop_ids=[2])
    assert whole == split


def test_train_mode_is_restored():
    model = llama().train()
    FastBackend().generate(model, PROMPTS, GenerationParams(4, 1.0), pad_id=0, stop_ids=[2])
    assert model.training


def test_unsupported_architectures_fall_back_or_fail_clearly():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4,
                                      n_positions=64)).eval()
    assert "gpt2" in unsupported_reason(gpt2)
    params = GenerationParams(max_new_tokens=5, temperature=0.0)
    expected = HFBackend().generate(gpt2, PROMPTS, params, pad_id=0, stop_ids=[2])
    assert FastBackend().generate(gpt2, PROMPTS, params, pad_id=0, stop_ids=[2]) == expected
    with pytest.raises(ModelError, match=r"sampling.backend=fast cannot decode GPT2LMHeadModel"):
        make_backend("fast").generate(gpt2, PROMPTS, params, pad_id=0, stop_ids=[2])
    windowed = _build(MistralForCausalLM, MistralConfig, sliding_window=4)
    assert "sliding-window" in unsupported_reason(windowed, max_len=20)
    assert unsupported_reason(windowed, max_len=4) is None
    with pytest.raises(ConfigError, match="sampling.backend: 'sglang' is not one of auto, fast, hf"):
        make_backend("sglang")


class _ScaledLlama(LlamaForCausalLM):
    """A Llama whose logits are post-processed: the lean loop must notice and fall back."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


def test_a_model_whose_logits_differ_falls_back_to_generate(caplog):
    model = _build(_ScaledLlama, LlamaConfig)
    backend = FastBackend()
    with caplog.at_level(logging.WARNING):
        assert "prefill logits differ" in backend.reason(model)
    assert "fast decoding disabled" in caplog.text
    params = GenerationParams(max_new_tokens=6, temperature=1.0)
    torch.manual_seed(0)
    expected = HFBackend().generate(model, PROMPTS, params, pad_id=0, stop_ids=[2])
    torch.manual_seed(0)
    assert backend.generate(model, PROMPTS, params, pad_id=0, stop_ids=[2]) == expected


def test_training_runs_are_identical_with_either_backend(tmp_path, prompt_file, tok):
    """The same on-policy run, decoded by the lean loop or by `generate`: same losses."""
    from opd.build import finish_models
    from opd.config import load_config
    from opd.logs import read_metrics
    from opd.tiny import tiny_llama
    from opd.train import distill

    losses = {}
    for backend in ("auto", "hf"):
        cfg = load_config(None, [
            f"output_dir={tmp_path / backend}", f"data.train={prompt_file}",
            f"data.eval={prompt_file}", "data.eval_count=4", "data.chat_template=false",
            "sampling.max_new_tokens=8", "train.batch_size=4", "train.progress=false",
            "train.lr=3e-3", "train.steps=3", "method.recipe=on_policy_rkl",
            f"sampling.backend={backend}",
        ])  # fmt: skip
        models = finish_models(tiny_llama(len(tok), hidden=64, layers=3, seed=11),
                               tiny_llama(len(tok), hidden=48, layers=2, seed=12), tok)
        assert FastBackend().reason(models.student) is None  # "auto" really is the lean loop
        res = distill(cfg, models=models, log=lambda *_: None)
        losses[backend] = [r["loss"] for r in res.metrics if "loss" in r]
        rows = read_metrics(res.run_dir / "metrics.jsonl")
        losses[backend + "_kl"] = [r["heldout_kl"] for r in rows if "heldout_kl" in r]
    assert losses["auto"] == pytest.approx(losses["hf"], rel=1e-5, abs=1e-7)
    assert losses["auto_kl"] == pytest.approx(losses["hf_kl"], rel=1e-5, abs=1e-7)
    assert len(losses["auto"]) == 3 and len(losses["auto_kl"]) == 2


def test_bf16_autocast_fuses_weights_once_in_bf16_with_the_same_tokens(monkeypatch):
    """Under bf16 autocast the fused q/k/v and gate/up weights are made in bfloat16 once per
    rollout; the reference twin keeps them float32 and lets autocast cast them at every
    step. Same values, so the same tokens and the same hidden states."""
    import opd.sampling.backends.fast as fast

    model = llama(dtype=torch.float32, seed=3, num_key_value_heads=2)
    ids = torch.tensor([[0, 0, 5, 6, 7], [11, 12, 13, 14, 15]])
    mask = (ids != 0).long()
    params = GenerationParams(max_new_tokens=10, temperature=1.0)
    outs = []
    for narrow in (True, False):
        if not narrow:  # the twin: float32 fused weights, cast by autocast in every matmul
            monkeypatch.setattr(fast, "_autocast_dtype", lambda weight: None)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            dec = _Decoder(model, 2, ids.shape[1])
            assert dec.layers[0].w_qkv.dtype == (torch.bfloat16 if narrow else torch.float32)
            assert dec.layers[0].w_gate_up.dtype == dec.layers[0].w_qkv.dtype
            hidden = dec.prefill(ids, mask)[0]
            torch.manual_seed(0)
            tokens = FastBackend().generate(model, PROMPTS, params, pad_id=0, stop_ids=(2,))
        outs.append((hidden, tokens))
    assert torch.equal(outs[0][0], outs[1][0])
    assert outs[0][1] == outs[1][1]
    with torch.no_grad():  # outside autocast nothing changes: float32 fused weights
        assert _Decoder(model, 2, 5).layers[0].w_qkv.dtype == torch.float32
