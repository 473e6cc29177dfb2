"""`load_model`: a causal LM and its tokenizer from a local folder, a GGUF file, the
embedded teacher, or a Hugging Face Hub id (through the local cache; see `opd.models.hub`).

Before a library parses anything, the path is checked: missing and unreadable are told
apart, and weight files are checked to be whole (`opd.models.files`). ``trust_remote_code`` is
never enabled, so only architectures that ship with ``transformers`` load; pickle weights
load only with ``allow_pickle=True``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from opd.errors import ModelError
from opd.models import embedded, files, hub

try:  # transformers >= 5 keeps GGUF weights packed unless told to dequantize
    from transformers import GgufConfig
except ImportError:  # older versions always dequantize
    GgufConfig = None

EXPECTED = (
    "expected a Hugging Face model folder with config.json, a .gguf file, a Hub id such as "
    f"HuggingFaceTB/SmolLM2-135M-Instruct, or '{embedded.EMBEDDED}'"
)
# A folder holds a usable tokenizer if it has one of these (tokenizer_config.json alone is not).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "*.model", "*.tiktoken")
_LOAD_ERRORS = (OSError, ValueError, SafetensorError)


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    allow_download: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
      spec: ``"embedded"``, a Hugging Face model folder (with ``config.json``), a ``.gguf``
        file path, or a Hub id ``org/name[@revision]`` (a local path of that name wins).
      dtype: parameter dtype of the returned model.
      device: device the model is moved to.
      allow_pickle: accept a folder whose only weights are pickle ``.bin`` files. Unpickling
        can run arbitrary code, so only do this for checkpoints you trust.
      allow_download: fetch a Hub id missing from the local cache (safetensors only).

    Returns:
      ``(model, tokenizer)``. The model is as ``from_pretrained`` returns it (the caller sets
      train or eval mode). The tokenizer pads on the left and has a pad token.

    Raises:
      ModelError: the path is missing, unreadable, truncated or corrupt, is not a model, a
        Hub id is not cached and downloads are not allowed, or the tokenizer has no usable
        pad token.
    """
    if str(spec) == embedded.EMBEDDED:
        cache = embedded.embedded_cache()
        try:
            model, tok = load_folder(cache, dtype, allow_pickle=False)
        except ModelError as e:  # a damaged cache: rebuilding it from the GGUF fixes it
            raise ModelError(f"{e} (embedded teacher: delete '{cache}' to rebuild it)") from e
        embedded.check_embedded_tokenizer(tok)
    else:
        path = Path(spec).expanduser()
        if not _exists(path, spec) and hub.looks_like_hub_id(str(spec)):
            path = hub.resolve_hub_model(str(spec), allow_download=allow_download)
        if not _exists(path, spec):
            raise ModelError(f"model path '{spec}' does not exist ({EXPECTED})")
        files.require_readable(path)
        if path.is_file() and path.suffix == ".gguf":
            model, tok = load_gguf(path, dtype)
        elif path.is_dir():
            model, tok = load_folder(path, dtype, allow_pickle=allow_pickle)
        else:
            raise ModelError(f"model path '{spec}' is a file but not a .gguf file ({EXPECTED})")
    _prepare_tokenizer(tok, spec)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id  # silences generate()'s warning
    return model.to(device), tok


def _exists(path: Path, spec) -> bool:
    """Whether ``path`` exists; a folder above it that cannot be searched is an error."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except PermissionError:
        raise ModelError(
            f"model path '{spec}' cannot be reached: permission denied on a folder above it"
        ) from None
    except OSError as e:
        raise ModelError(f"model path '{spec}' cannot be read: {e.strerror or e}") from None
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_folder(path: Path, dtype: torch.dtype, allow_pickle: bool):
    """A Hugging Face folder: safetensors weights, or pickle ones when allowed."""
    files.require_readable(path)
    config = path / "config.json"
    if not config.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; to load a GGUF file pass its path, e.g. '{path / ggufs[0]}'" if ggufs else ""
        raise ModelError(
            f"model folder '{path}' has no config.json, so it is not a Hugging Face model{hint}"
        )
    files.require_readable(config)
    has_safetensors = any(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.glob("*.bin"))
    if not has_safetensors and pickles and not allow_pickle:
        raise ModelError(
            f"model folder '{path}' holds only pickle weights ({pickles[0]}); unpickling can run "
            f"arbitrary code, so opd refuses it: re-save it as safetensors with "
            f"save_pretrained(), or pass allow_pickle=True if you trust its source"
        )
    if not has_safetensors and not pickles and not (path / "model.safetensors.index.json").exists():
        raise ModelError(
            f"model folder '{path}' has config.json but no weights (model.safetensors); "
            f"save the model with save_pretrained() or re-download it"
        )
    if not any(next(path.glob(pattern), None) for pattern in _TOKENIZER_FILES):
        raise ModelError(
            f"model folder '{path}' has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
            f"save it there with tokenizer.save_pretrained('{path}')"
        )
    files.check_weight_files(path)
    common = {"local_files_only": True, "trust_remote_code": False}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            use_safetensors=has_safetensors,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, naming the folder
            **common,
        )
    except _LOAD_ERRORS as e:
        raise ModelError(f"cannot load the model in folder '{path}': {_first_line(e)}") from e
    _check_loading_info(info, path)
    try:
        tok = AutoTokenizer.from_pretrained(path, **common)
    except _LOAD_ERRORS as e:
        raise ModelError(f"cannot load the tokenizer in folder '{path}': {_first_line(e)}") from e
    return model, tok


def _check_loading_info(info: dict, path: Path) -> None:
    """Weights that do not fit config.json would be left randomly initialised: refuse."""
    mismatched = list(info.get("mismatched_keys") or [])
    missing = sorted(info.get("missing_keys") or [])
    if mismatched:
        name, got, want = mismatched[0]
        raise ModelError(
            f"weights in model folder '{path}' do not match its config.json: {len(mismatched)} "
            f"tensors have other shapes, e.g. {name} is {tuple(got)} in the weights but "
            f"{tuple(want)} in the model the config describes"
        )
    if missing:
        raise ModelError(
            f"weights in model folder '{path}' lack {len(missing)} tensors its config.json "
            f"needs, e.g. {missing[0]} (they would be random); re-save or re-download the model"
        )


def load_gguf(path: Path, dtype: torch.dtype):
    """A GGUF file, dequantized into a dense, trainable and serializable model."""
    files.check_gguf(path)
    kwargs = {"gguf_file": path.name, "local_files_only": True, "trust_remote_code": False}
    extra = {} if GgufConfig is None else {"quantization_config": GgufConfig(dequantize=True)}
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs, **extra)
        tok = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    except (*_LOAD_ERRORS, KeyError) as e:
        raise ModelError(f"cannot load GGUF file '{path}': {_first_line(e)}") from e
    # Some versions leave a GGUF "quantizer" on a dequantized model; it blocks save_pretrained.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model, tok


def load_tokenizer(spec: str | os.PathLike):
    """A tokenizer alone, from a folder (no model weights needed) or a .gguf file."""
    path = Path(spec)
    common = {"local_files_only": True, "trust_remote_code": False}
    if path.suffix == ".gguf" and path.is_file():
        common["gguf_file"], path = path.name, path.parent
    elif not path.is_dir():
        raise ModelError(f"tokenizer '{spec}': not a folder or a .gguf file")
    try:
        tok = AutoTokenizer.from_pretrained(path, **common)
    except (*_LOAD_ERRORS, KeyError) as e:
        raise ModelError(f"cannot load the tokenizer in '{spec}': {_first_line(e)}") from e
    _prepare_tokenizer(tok, spec)
    return tok


def _prepare_tokenizer(tok, spec) -> None:
    """Left padding (generation appends on the right) and a pad token: eos, else unk."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise ModelError(f"tokenizer of '{spec}' has no pad, eos or unk token to pad with")
        tok.pad_token = fallback
