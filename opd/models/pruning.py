"""A student built by pruning the teacher's depth: keep K evenly spaced decoder layers.

Deviation: evenly spaced layers are the simplest of the layer-selection rules in the
distillation literature (DistilBERT keeps every other layer); no search for the best subset.
"""

from __future__ import annotations

import copy
from fractions import Fraction

from torch import nn
from transformers import PreTrainedModel

from opd.errors import ConfigError, ModelError


def pruned_layer_indices(num_layers: int, keep: int, option: str = "layers") -> list[int]:
    """Which teacher layers a depth-pruned student keeps: ``round(linspace(0, L-1, K))``.

    Args:
      num_layers: L, the teacher's decoder layers.
      keep: K, the student's, in ``[1, L]``. K >= 2 always keeps the first and the last
        layer; K = 1 keeps layer 0 only.
      option: the name the error message gives K (``model.student_layers`` from a config).

    Returns:
      K sorted, distinct layer indices (the spacing (L-1)/(K-1) >= 1 makes rounding
      distinct). Computed exactly, ties to even: float ``linspace`` implementations differ
      on ties (for L=30, K=15 numpy rounds the 8th value, 14.5, to 15; this gives 14).

    Raises:
      ConfigError: K is outside ``[1, L]``.
    """
    if not 1 <= keep <= num_layers:
        raise ConfigError(
            f"{option}={keep} is out of range: the teacher has {num_layers} decoder layers, so "
            f"{option} must be in [1, {num_layers}]"
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


def num_decoder_layers(model: nn.Module) -> int:
    """L, the number of decoder layers a prunable model has."""
    holder, name = _decoder_layers(model)
    return len(getattr(holder, name))


def student_from_teacher(
    teacher: PreTrainedModel, layers: int, option: str = "layers"
) -> PreTrainedModel:
    """A depth-pruned copy of the teacher, keeping ``pruned_layer_indices(L, layers)``.

    The copy shares no tensors with the teacher; all its parameters require grad (a frozen
    teacher still gives a trainable student); its train/eval mode is the teacher's. Kept
    attention modules are renumbered 0..K-1 so the KV cache indexes them correctly, and
    ``config.num_hidden_layers`` and ``config.layer_types`` (if any) follow. (A GPT-2 with
    ``scale_attn_by_inverse_layer_idx`` rescales its attention by the new numbers.)

    Args:
      teacher: a Llama-family or GPT-2 causal LM.
      layers: K, the student's number of decoder layers, in ``[1, L]``.
      option: the name errors give ``layers``.

    Returns:
      The student model.

    Raises:
      ConfigError: ``layers`` is outside ``[1, L]``.
      ModelError: the architecture is not supported.
    """
    keep = pruned_layer_indices(num_decoder_layers(teacher), layers, option)
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
