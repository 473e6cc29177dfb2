"""LoRA students through `peft` (`model.lora_r > 0`).

Each targeted linear layer W (d_out × d_in, frozen) gets a trainable low-rank update:

    y = W x + (alpha / r) · B A dropout(x),   A: r × d_in (random), B: d_out × r (zeros)

so the wrapped student starts equal to the base. Only A and B require grad; the optimizer,
which takes the parameters with `requires_grad`, trains only them. Embeddings, norms and the
lm_head stay frozen (`model.lora_targets` names the modules; default the attention and MLP
projections of Llama-family models).

The lean decoder sees through the wrapper: `decoder_and_head` asks the `PeftModel` for
`get_decoder()` / `get_output_embeddings()`, which reach the underlying model, whose layers
peft has replaced in place by LoRA layers, so the student's forward uses the adapters
(`apply_lora` checks the split once). The static-cache generation backend reads raw weight
matrices and would skip the adapters, so it refuses a `PeftModel` (`sampling.backend=auto`
then decodes with Hugging Face `generate`, which runs the adapters).

Saving (`save_lora_student`): `student/adapter/` holds the adapter (peft's
`adapter_model.safetensors` + `adapter_config.json`), loadable onto the base student with
`PeftModel.from_pretrained(base, "student/adapter")`; `student/` holds the merged model
W + (alpha / r) · B A, loadable with `AutoModelForCausalLM.from_pretrained("student")`. The
merge runs on a copy, so the training model keeps its adapters. Checkpoints hold the
wrapped model's whole state dict (base + adapters), so a resumed run is exact.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from opd.errors import ConfigError

PEFT_MISSING = (
    "model.lora_r > 0 needs the peft package: pip install 'opd[lora]' (or pip install peft)"
)


def is_lora(model) -> bool:
    """Whether `model` is a peft-wrapped model."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def lora_targets(text: str) -> list[str]:
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise ConfigError("model.lora_targets: empty; give module names, e.g. q_proj,v_proj")
    return targets


def apply_lora(student: torch.nn.Module, r: int, alpha: float, targets: str, dropout: float):
    """Wrap `student` with LoRA adapters of rank `r` (a `PeftModel`); unchanged when r == 0
    or when it already is one. Refuses (ConfigError) targets the student does not have."""
    if r == 0 or is_lora(student):
        return student
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError(PEFT_MISSING) from None
    names = lora_targets(targets)
    leaves = {n.rsplit(".", 1)[-1] for n, m in student.named_modules() if n}
    missing = [t for t in names if t not in leaves]
    if missing:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in student.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
        )
        raise ConfigError(
            f"model.lora_targets: the student has no module named {', '.join(missing)} "
            f"(its linear layers: {', '.join(linear)})"
        )
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=names, lora_dropout=dropout, task_type="CAUSAL_LM"
    )
    wrapped = get_peft_model(student, cfg)
    from opd.models.heads import decoder_and_head

    decoder_and_head(wrapped, verify=True)  # the lean split sees through the wrapper
    return wrapped


def trainable_count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merged_copy(student: torch.nn.Module) -> torch.nn.Module:
    """A plain model with the adapters merged into its weights (the student keeps its own)."""
    return copy.deepcopy(student).merge_and_unload()


def save_lora_student(student, tokenizer, folder: Path) -> None:
    """The adapter to `folder/adapter` and the merged model (+ tokenizer) to `folder`."""
    merged = merged_copy(student)
    merged.save_pretrained(folder)  # safetensors by default
    tokenizer.save_pretrained(folder)
    student.save_pretrained(folder / "adapter")  # adapter_model.safetensors + adapter_config
