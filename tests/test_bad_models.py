"""Bad model inputs through the real CLI: each one exits 2 with one `opd: error:` line that
names the file or option, no traceback, and no run folder is created.

Every case starts from pristine tiny model folders (built once per module) and breaks one
thing. Permission cases run as root too: root reads any file, so there `os.access` answers
from the permission bits, as it would for the file's owner.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from transformers import PhiConfig, PhiForCausalLM

from opd.tiny import char_tokenizer, tiny_gguf, tiny_llama
from tests.helpers import (
    assert_clean_error,
    run_opd,
    save_tiny_models,
    small_cli_args,
    tree_digest,
    write_prompts,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Saved teacher/student folders, a valid GGUF, a biased-head model, another tokenizer."""
    root = tmp_path_factory.mktemp("pristine")
    teacher, student = save_tiny_models(root)
    tiny_gguf(root / "tiny.gguf")
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = PhiConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    phi = PhiForCausalLM(cfg)
    phi.save_pretrained(root / "phi")
    tok.save_pretrained(root / "phi")
    other = char_tokenizer("zyxabc")
    tiny_llama(len(other), hidden=48).save_pretrained(root / "other_tok")
    other.save_pretrained(root / "other_tok")
    return root


def _copy(pristine: Path, name: str, dst: Path) -> Path:
    src = pristine / name
    if src.is_dir():
        shutil.copytree(src, dst / name)
    else:
        shutil.copy(src, dst / name)
    return dst / name


def _access_by_mode_bits(path, mode, *args, **kwargs):
    """os.access as the file's owner would see it (root ignores permission bits)."""
    bits = stat.S_IMODE(os.stat(path).st_mode)
    if mode & os.R_OK and not bits & stat.S_IRUSR:
        return False
    if mode & os.X_OK and not bits & stat.S_IXUSR:
        return False
    return True


# Each case: (id, how to break the inputs, needles the one error line must contain).
# `make(pristine, tmp) -> (teacher, student, extra overrides, needles)`.


def _missing(p, tmp):
    return tmp / "no_such_model", _copy(p, "student", tmp), [], ["no_such_model", "does not exist"]


def _unreadable_folder(p, tmp):
    t = _copy(p, "teacher", tmp)
    t.chmod(0)
    return t, _copy(p, "student", tmp), [], [str(t), "not readable"]


def _unreadable_gguf(p, tmp):
    g = _copy(p, "tiny.gguf", tmp)
    g.chmod(0)
    return _copy(p, "teacher", tmp), g, [], [str(g), "not readable"]


def _unreadable_weights(p, tmp):
    t = _copy(p, "teacher", tmp)
    (t / "model.safetensors").chmod(0)
    return t, _copy(p, "student", tmp), [], [str(t / "model.safetensors"), "not readable"]


def _broken_safetensors(cut):
    def make(p, tmp):
        t = _copy(p, "teacher", tmp)
        f = t / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(cut(data))
        return t, _copy(p, "student", tmp), [], [str(f)]

    return make


def _gguf(cut, needle):
    def make(p, tmp):
        g = _copy(p, "tiny.gguf", tmp)
        g.write_bytes(cut(g.read_bytes()))
        return g, None, ["model.student=", "model.student_layers=1"], [str(g), needle]

    return make


def _pickle_only(p, tmp):
    t = _copy(p, "teacher", tmp)
    from safetensors.torch import load_file

    torch.save(load_file(t / "model.safetensors"), t / "pytorch_model.bin")
    (t / "model.safetensors").unlink()
    return t, _copy(p, "student", tmp), [], [str(t), "pickle"]


def _without(name, needle):
    def make(p, tmp):
        t = _copy(p, "teacher", tmp)
        for f in list(t.iterdir()):
            if f.name in name:
                f.unlink()
        return t, _copy(p, "student", tmp), [], [str(t), needle]

    return make


def _bad_config_json(p, tmp):
    t = _copy(p, "teacher", tmp)
    (t / "config.json").write_text("{not json")
    return t, _copy(p, "student", tmp), [], [str(t), "config"]


def _missing_shard(p, tmp):
    t = _copy(p, "teacher", tmp)
    (t / "model.safetensors").rename(t / "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (t / "model.safetensors.index.json").write_text(json.dumps(index))
    return t, _copy(p, "student", tmp), [], ["model-00002-of-00002.safetensors", "missing"]


def _weights_of_another_model(p, tmp):
    t = _copy(p, "teacher", tmp)
    shutil.copy(p / "student" / "model.safetensors", t / "model.safetensors")  # 48 wide, 2 deep
    return t, _copy(p, "student", tmp), [], [str(t), "do not match its config.json"]


def _weights_missing_tensors(p, tmp):
    from safetensors.torch import load_file, save_file

    t = _copy(p, "teacher", tmp)
    tensors = load_file(t / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".layers.2." not in k}, t / "model.safetensors")
    return t, _copy(p, "student", tmp), [], [str(t), "lack", "model.layers.2."]


def _not_a_model_file(p, tmp):
    f = tmp / "weights.txt"
    f.write_text("hello")
    return f, _copy(p, "student", tmp), [], [str(f), ".gguf"]


def _other_tokenizer(p, tmp):
    return _copy(p, "teacher", tmp), _copy(p, "other_tok", tmp), [], ["tokenizers", "ids"]


def _biased_head(p, tmp):
    phi = _copy(p, "phi", tmp)
    return phi, _copy(p, "student", tmp), [], [str(phi), "bias", "lm_head"]


def _layers_out_of_range(p, tmp):
    t = _copy(p, "teacher", tmp)
    extra = ["model.student=", "model.student_layers=9"]
    return t, None, extra, ["model.student_layers=9", "pruned", "[1, 3]"]


def _option(*extra_and_needles):
    *extra, needle = extra_and_needles

    def make(p, tmp):
        return _copy(p, "teacher", tmp), _copy(p, "student", tmp), list(extra), [needle]

    return make


def _hub_not_cached(p, tmp):
    cache = tmp / "hf-cache"  # HF_HUB_CACHE, set by the test
    needles = ["HuggingFaceTB/SmolLM2-135M-Instruct", "model.allow_download=true", str(cache)]
    return "HuggingFaceTB/SmolLM2-135M-Instruct", _copy(p, "student", tmp), [], needles


CASES = {
    "missing-path": _missing,
    "unreadable-folder": _unreadable_folder,
    "unreadable-gguf": _unreadable_gguf,
    "unreadable-weights": _unreadable_weights,
    "safetensors-truncated": _broken_safetensors(lambda b: b[: len(b) // 2]),
    "safetensors-header-cut": _broken_safetensors(lambda b: b[:50]),
    "safetensors-garbage": _broken_safetensors(lambda b: b"\x00garbage" * 100),
    "safetensors-empty": _broken_safetensors(lambda b: b""),
    "safetensors-trailing-bytes": _broken_safetensors(lambda b: b + b"\x00" * 16),
    "gguf-garbage": _gguf(lambda b: b"\x01garbage" * 100, "not a GGUF file"),
    "gguf-header-cut": _gguf(lambda b: b[:30], "truncated"),
    "gguf-metadata-cut": _gguf(lambda b: b[:2000], "truncated"),
    "gguf-tensor-data-cut": _gguf(lambda b: b[:-100], "truncated"),
    "gguf-empty": _gguf(lambda b: b"", "empty"),
    "pickle-only-folder": _pickle_only,
    "no-config-json": _without({"config.json"}, "config.json"),
    "no-weights": _without({"model.safetensors"}, "no weights"),
    "no-tokenizer": _without({"tokenizer.json", "tokenizer_config.json"}, "no tokenizer"),
    "config-json-invalid": _bad_config_json,
    "missing-shard": _missing_shard,
    "weights-of-another-model": _weights_of_another_model,
    "weights-missing-tensors": _weights_missing_tensors,
    "not-a-model-file": _not_a_model_file,
    "different-tokenizers": _other_tokenizer,
    "biased-lm-head": _biased_head,
    "student-layers-out-of-range": _layers_out_of_range,
    "bad-dtype": _option("model.dtype=float8", "model.dtype"),
    "bad-device": _option("model.device=tpu", "model.device"),
    "device-unsupported-type": _option("model.device=meta", "model.device"),
    "cuda-unavailable": _option("model.device=cuda:7", "model.device"),
    "hub-id-not-cached-offline": _hub_not_cached,
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_model_input(case, pristine, tmp_path, monkeypatch):
    if case == "cuda-unavailable" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    if os.geteuid() == 0:
        monkeypatch.setattr("opd.models.files._access", _access_by_mode_bits)
    data = write_prompts(tmp_path / "prompts.jsonl", n=8)
    teacher, student, extra, needles = CASES[case](pristine, tmp_path)
    args = small_cli_args(tmp_path, (teacher, student or ""), data, *extra)
    try:
        res = run_opd(["distill", *args])
    finally:
        for path in tmp_path.rglob("*"):  # let pytest clean up what a case made unreadable
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)
    assert_clean_error(res, *needles)
    assert not (tmp_path / "run").exists()  # failed before creating the run folder


def test_resume_with_a_damaged_teacher_changes_nothing(tmp_path):
    """An earlier run, then its teacher file is cut: --resume refuses and the run is untouched."""
    teacher, student = save_tiny_models(tmp_path / "models")
    data = write_prompts(tmp_path / "prompts.jsonl", n=8)
    args = small_cli_args(tmp_path, (teacher, student), data, "train.checkpoint_every=1")
    first = run_opd(["distill", *args, "--no-report"])
    assert first.code == 0, first.err + str(first.traceback)
    run_dir = tmp_path / "run"
    before = tree_digest(run_dir)
    assert any("checkpoint" in name for name in before)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    res = run_opd(["distill", "--resume", str(run_dir)])
    assert_clean_error(res, str(weights), "truncated")
    assert tree_digest(run_dir) == before
