"""Tests for where models come from and what is refused: Hub ids through the local Hugging
Face cache (built in the test; nothing is downloaded), weight-file integrity checks, biased
lm_heads, unreadable paths, the pruned student's layer count, devices."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import PhiConfig, PhiForCausalLM

from opd.build import build_models, finish_models, resolve_device
from opd.config import load_config
from opd.errors import ConfigError, ModelError
from opd.models import decoder_and_head, hub_cache_dir, load_model, looks_like_hub_id
from opd.models.files import check_gguf, check_safetensors
from opd.tiny import char_tokenizer, tiny_gguf, tiny_llama
from tests.helpers import save_tiny_models

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
COMMIT = "a" * 40


def _into_hub_cache(model, tok, cache: Path, repo: str = REPO, commit: str = COMMIT) -> Path:
    """Save a model the way huggingface_hub caches it: blobs by hash, snapshot symlinks, a ref."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    staging = storage / "staging"
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in staging.iterdir():
        blob = storage / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    staging.rmdir()
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    return snapshot


def _logits(model, vocab: int):
    ids_BT = torch.arange(5, min(vocab, 17))[None]
    with torch.no_grad():
        return model.eval()(ids_BT).logits


@pytest.fixture
def no_download(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("nothing may be downloaded")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    return calls


# --- Hub ids ---------------------------------------------------------------------------------


def test_looks_like_hub_id():
    for spec in (REPO, "gpt2/gpt2", "org/name@v1.0", f"org/name@{COMMIT}"):
        assert looks_like_hub_id(spec), spec
    for spec in ("embedded", "./org/name", "/abs/path", "a/b/c", "org/model.gguf", "name", ""):
        assert not looks_like_hub_id(spec), spec


def test_hub_cache_dir_follows_environment(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub_cache_dir() == tmp_path / "hub"


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_id_loads_from_cache_offline(env, tmp_path, monkeypatch, no_download):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    monkeypatch.setenv(env, str(cache if env == "HF_HUB_CACHE" else tmp_path))
    tok = char_tokenizer()
    model = tiny_llama(len(tok), seed=3)
    _into_hub_cache(model, tok, cache)
    for spec in (REPO, f"{REPO}@{COMMIT}", f"{REPO}@main"):
        loaded, loaded_tok = load_model(spec)
        torch.testing.assert_close(_logits(loaded, len(tok)), _logits(model, len(tok)))
        assert loaded_tok.get_vocab() == tok.get_vocab()
    assert no_download == []


def test_hub_id_not_cached_offline(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError) as err:
        load_model(REPO)
    msg = str(err.value)
    assert f"not in the Hugging Face cache at '{tmp_path / 'hub'}" in msg
    assert "models--HuggingFaceTB--SmolLM2-135M-Instruct" in msg
    assert "model.allow_download=true" in msg and "\n" not in msg
    with pytest.raises(ModelError, match="at revision v2"):  # a ref that is not cached
        load_model(f"{REPO}@v2")
    assert no_download == []


def test_hub_download_only_when_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    tok = char_tokenizer()
    model = tiny_llama(len(tok), seed=4)
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        assert not huggingface_hub.constants.HF_HUB_OFFLINE  # lifted for this call only
        return str(_into_hub_cache(model, tok, Path(kwargs["cache_dir"]), repo_id))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="allow_download"):
        load_model(REPO)
    assert calls == []
    loaded, _ = load_model(REPO, allow_download=True)
    torch.testing.assert_close(_logits(loaded, len(tok)), _logits(model, len(tok)))
    ((repo_id, kwargs),) = calls
    assert repo_id == REPO and kwargs["revision"] == "main"
    assert kwargs["cache_dir"] == str(tmp_path / "hub")
    assert "*.safetensors" in kwargs["allow_patterns"]
    assert not any(p.endswith((".bin", ".pt", ".pth", "*")) for p in kwargs["allow_patterns"])
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True  # restored
    load_model(REPO)  # now cached: no second download
    assert len(calls) == 1


def test_hub_download_failure_and_pickle_only_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    def offline(repo_id, **kwargs):
        raise OSError("network unreachable\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelError, match=f"cannot download Hub model {REPO}.*network unreachable$"):
        load_model(REPO, allow_download=True)

    def pickle_only(repo_id, **kwargs):
        folder = tmp_path / "snap"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", pickle_only)
    with pytest.raises(ModelError, match="no safetensors weights.*pickle"):
        load_model(REPO, allow_download=True)


def test_local_folder_named_like_a_hub_id_wins(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    tok = char_tokenizer()
    model = tiny_llama(len(tok), seed=5)
    model.save_pretrained(tmp_path / "org" / "name")
    tok.save_pretrained(tmp_path / "org" / "name")
    loaded, _ = load_model("org/name")
    torch.testing.assert_close(_logits(loaded, len(tok)), _logits(model, len(tok)))


def test_build_models_hub_teacher_through_config(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    tok = char_tokenizer()
    _into_hub_cache(tiny_llama(len(tok), layers=3, seed=6), tok, tmp_path / "hub")
    cfg = load_config(None, [f"model.teacher={REPO}", "model.student_layers=2", "model.device=cpu"])
    assert cfg.model.allow_download is False
    models = build_models(cfg)
    assert models.student.config.num_hidden_layers == 2 and models.vocab_size == len(tok)


# --- weight files ----------------------------------------------------------------------------


def test_check_safetensors(tmp_path):
    tok = char_tokenizer()
    tiny_llama(len(tok)).save_pretrained(tmp_path / "m")
    good = tmp_path / "m" / "model.safetensors"
    check_safetensors(good)
    data = good.read_bytes()
    for name, cut, needle in [
        ("half", data[: len(data) // 2], "is truncated: its tensors need"),
        ("head", data[:20], "header length says"),
        ("short", data[:5], "empty or truncated"),
        ("tail", data + b"x", "1 unexpected bytes"),
        ("json", data[:8] + b"{" * (len(data) - 8), "not valid JSON"),
    ]:
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(cut)
        with pytest.raises(ModelError, match=needle) as err:
            check_safetensors(bad)
        assert str(bad) in str(err.value)


def test_check_gguf_every_cut_is_caught(tmp_path):
    path = tmp_path / "ok.gguf"
    tiny_gguf(path)
    check_gguf(path)
    data = path.read_bytes()
    for n in (0, 3, 10, 24, 100, 1000, 5000, 5600, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{n}.gguf"
        bad.write_bytes(data[:n])
        with pytest.raises(ModelError, match="truncated|empty") as err:
            check_gguf(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)
    wrong = tmp_path / "v9.gguf"
    wrong.write_bytes(data[:4] + (9).to_bytes(4, "little") + data[8:])
    with pytest.raises(ModelError, match="version 9"):
        check_gguf(wrong)


# --- refused heads ---------------------------------------------------------------------------


def _phi(vocab: int) -> PhiForCausalLM:
    torch.manual_seed(0)
    cfg = PhiConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4,
    )  # fmt: skip
    return PhiForCausalLM(cfg)


def test_biased_lm_head_refused_plain_head_kept(tok):
    teacher = tiny_llama(len(tok), seed=1)
    biased = tiny_llama(len(tok), seed=2)
    biased.lm_head = torch.nn.Linear(64, len(tok), bias=True)
    for model in (biased, _phi(len(tok))):
        with pytest.raises(ModelError, match="bias on its output layer"):
            decoder_and_head(model, verify=False)
        with pytest.raises(ModelError, match=type(model).__name__):
            finish_models(teacher, model, tok)  # as student
        with pytest.raises(ModelError, match="lm_head"):
            finish_models(model, tiny_llama(len(tok)), tok)  # as teacher
    decoder_fn, head_VD, bias = decoder_and_head(teacher)  # the plain head: exact logits
    ids_BT = torch.arange(5, 15)[None]
    with torch.no_grad():
        torch.testing.assert_close(decoder_fn(ids_BT) @ head_VD.T, teacher.eval()(ids_BT).logits)
    assert bias is None


def test_build_models_names_the_biased_model(tmp_path):
    tok = char_tokenizer()
    _phi(len(tok)).save_pretrained(tmp_path / "phi")
    tok.save_pretrained(tmp_path / "phi")
    t, _ = save_tiny_models(tmp_path)
    cfg = load_config(None, [f"model.teacher={t}", f"model.student={tmp_path / 'phi'}"])
    with pytest.raises(ModelError, match=f"model '{tmp_path / 'phi'}' \\(PhiForCausalLM\\)"):
        build_models(cfg)


# --- unreadable paths, pruning, devices --------------------------------------------------------


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root reads any file; tests/test_bad_models.py emulates"
)
def test_unreadable_is_not_missing(tmp_path):
    t, _ = save_tiny_models(tmp_path)
    hidden = tmp_path / "locked"
    hidden.mkdir()
    shutil.move(t, hidden / "teacher")
    try:
        hidden.chmod(0o600)  # listable bit off: the folder inside cannot be reached
        with pytest.raises(ModelError, match="cannot be reached: permission denied"):
            load_model(hidden / "teacher")
        hidden.chmod(0o700)
        (hidden / "teacher").chmod(0)
        with pytest.raises(ModelError, match="exists but is not readable"):
            load_model(hidden / "teacher")
    finally:
        hidden.chmod(0o700)
        (hidden / "teacher").chmod(0o700)


def test_pruned_student_layers_message(tmp_path):
    t, _ = save_tiny_models(tmp_path)
    for layers in (0, 4):
        cfg = load_config(None, [f"model.teacher={t}", "model.device=cpu"])
        cfg.model.student_layers = layers  # 0 bypasses the config's own ge=1 check
        with pytest.raises(ConfigError) as err:
            build_models(cfg)
        assert str(err.value).startswith(f"model.student_layers={layers} is out of range")
        assert "pruned from the teacher" in str(err.value) and "[1, 3]" in str(err.value)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    for bad, needle in [("tpu", "not a device"), ("meta", "not supported"), ("cuda:x", "not a")]:
        with pytest.raises(ConfigError, match=needle):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
    else:
        with pytest.raises(ConfigError, match="index must be in"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_damaged_embedded_cache_says_how_to_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path))
    tok = char_tokenizer()
    cache = tmp_path / "smollm2-135m-instruct"
    tiny_llama(len(tok)).save_pretrained(cache)
    tok.save_pretrained(cache)
    weights = cache / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError) as err:
        load_model("embedded")
    assert f"'{weights}' is truncated" in str(err.value)
    assert f"delete '{cache}' to rebuild it" in str(err.value)


def test_partial_hub_snapshot_is_named(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    tok = char_tokenizer()
    snapshot = _into_hub_cache(tiny_llama(len(tok)), tok, tmp_path / "hub")
    (snapshot / "config.json").unlink()
    with pytest.raises(ModelError, match="only partly in the Hugging Face cache") as err:
        load_model(REPO)
    assert str(snapshot) in str(err.value) and "model.allow_download=true" in str(err.value)
