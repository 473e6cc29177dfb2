"""Mixed precision (`train.precision=bf16`) and `train.gradient_checkpointing`.

bf16 mixed precision, what runs in which dtype:

    weights, gradients, AdamW moments      float32 (the master copy; model.dtype stays float32)
    rollouts (generation)                  under torch.autocast(bfloat16): matmuls in bf16,
                                           the logits upcast to float32 for sampling
    teacher forward (no grad)              under autocast (its head: see "heads" below)
    student decoder forward                under autocast; its completion rows h_s (N, D) leave
                                           the decoder's final norm in float32
    heads (the loss's logits)              float32 by default: the rows h and heads W of both
                                           models are projected outside autocast. With
                                           train.bf16_logits=true the rows are cast to bf16
                                           (`autocast_rows`) and the heads with them, by
                                           differentiable `.to`s, so the head matmuls run in
                                           bf16 as autocast runs an lm_head (dL/dW_s arrives
                                           in float32 on the master)
    student backward                       outside autocast (PyTorch's rule): each op's backward
                                           runs in the dtype its forward ran in
    loss                                   outside autocast: logits blocks h @ W.T (float32;
                                           bf16 with train.bf16_logits, as on the pure
                                           model.dtype=bfloat16 path), then log-softmax,
                                           divergences, the per-token values and their weighted
                                           sum in float32 (`opd.losses.divergences.upcast`);
                                           the chunked losses add each chunk's head gradient
                                           into a float32 buffer (`opd.losses.chunked`,
                                           `opd.losses.one_pass`)

Why the heads stay float32: bf16 keeps 8 bits of mantissa, so bf16 logits carry a relative
error of about 2⁻⁸ ≈ 0.4 % (0.03–0.06 nats on logits of 8–16), in both models' log-probs,
where distillation takes their difference. On the demo (30 steps, 3 seeds, 1 thread, an
AVX512-BF16 CPU) bf16 logits left the held-out KL(q_student ‖ p_teacher) at 2.13 ± 0.40
against float32's 1.50 ± 0.17, worse on every seed; float32 logits under the same autocast
gave 1.66 ± 0.28, and 1.54 against float32's 1.54 over six seeds
(benchmarks/results_precision.md). The heads are about a third of the student's matmul work
here; measured, float32 heads cost no visible step time (6.47 s vs 6.61 s), and
`train.bf16_logits=true` is there for devices where they do.

Deviations from a plain float32 run: the decoders' matmuls run in bf16; the tests
(tests/test_precision.py) hold one micro-step's loss and gradient to a stated tolerance of
the float32 twin. Held-out evaluation stays in float32 (it is the yardstick both precisions
are compared with).

Refused (one line): precision=bf16 with model.dtype=bfloat16/float16 (the weights are already
narrow: there is no float32 master copy to keep), on a device where a bfloat16 autocast
matmul fails (an old GPU), and train.bf16_logits=true without precision=bf16. A CPU without
native bf16 instructions (no AVX512-BF16 / AMX) runs it emulated, usually slower than
float32: `bf16_note` says so at the start of a run.

Gradient checkpointing: the lean decoder (`opd.models.decoder_and_head`) calls the model's own
decoder module, so Hugging Face's per-layer checkpointing (`gradient_checkpointing_enable`,
non-reentrant `torch.utils.checkpoint`) is what it runs: each decoder layer keeps only its
input for the backward and recomputes its activations there. Same loss and gradients (the
recomputation is the same arithmetic), less activation memory, about one more decoder forward
per step.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from opd.errors import ConfigError

PRECISIONS = ("fp32", "bf16")


def bf16_supported(device: torch.device) -> bool:
    """Whether a bfloat16 autocast matmul runs on `device` (a small probe)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        x = torch.ones(2, 2, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return (x @ x).dtype == torch.bfloat16
    except (RuntimeError, TypeError):
        return False


def native_cpu_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def check_precision(precision: str, student: torch.nn.Module) -> None:
    """Refuse a precision the student's weights or device cannot run (ConfigError, one line)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision={precision!r}: valid: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return
    param = next(student.parameters())
    if param.dtype != torch.float32:
        name = str(param.dtype).removeprefix("torch.")
        raise ConfigError(
            f"train.precision=bf16 needs float32 weights (the master copy autocast reads), but "
            f"the student's are {name} (model.dtype={name}); use model.dtype=float32 with "
            f"train.precision=bf16, or model.dtype={name} with train.precision=fp32"
        )
    if not bf16_supported(param.device):
        raise ConfigError(
            f"train.precision=bf16: the device {param.device} cannot run bfloat16 (a bf16 "
            "autocast matmul failed); use train.precision=fp32"
        )


def bf16_note(precision: str, device: torch.device) -> str | None:
    """A warning line when bf16 runs emulated (a CPU without AVX512-BF16/AMX), else None."""
    if precision == "bf16" and device.type == "cpu" and not native_cpu_bf16():
        cap = torch.backends.cpu.get_cpu_capability()
        return (
            f"train.precision=bf16 on a CPU without bf16 instructions ({cap}): bfloat16 "
            "matmuls are emulated and usually slower than float32 here"
        )
    return None


# Whether `autocast_rows` casts the heads' rows to bf16 inside the current `autocast` context
# (train.bf16_logits); set by `autocast`, read where the rows are made.
_NARROW_LOGITS: contextvars.ContextVar[bool] = contextvars.ContextVar("narrow", default=False)


def mode(train_cfg) -> str:
    """The precision mode `autocast` takes: fp32, bf16 (float32 logits) or bf16-logits."""
    if train_cfg.precision == "bf16" and train_cfg.bf16_logits:
        return "bf16-logits"
    return train_cfg.precision


@contextlib.contextmanager
def autocast(precision: str, device: torch.device):
    """The context the student's forward, the teacher and the rollouts run in: nothing for
    fp32, bfloat16 autocast for bf16 and bf16-logits (the latter with bf16 head rows)."""
    if precision not in ("bf16", "bf16-logits"):
        yield
        return
    token = _NARROW_LOGITS.set(precision == "bf16-logits")
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    finally:
        _NARROW_LOGITS.reset(token)


def autocast_rows(hidden_ND: torch.Tensor) -> torch.Tensor:
    """The rows a head will project: in the autocast dtype under `autocast("bf16-logits")` (as
    autocast would run an lm_head); unchanged otherwise (float32 logits, the bf16 default).

    A Llama-family decoder under autocast returns float32 hidden states (its residual stream
    and final RMSNorm stay float32): left so, the head matmul runs in float32 (the bf16
    default); cast, it runs in bf16. Differentiable: the gradient comes back in float32."""
    device = hidden_ND.device.type
    if not torch.is_autocast_enabled(device) or not _NARROW_LOGITS.get():
        return hidden_ND
    return hidden_ND.to(torch.get_autocast_dtype(device))


def like_rows(head_VD: torch.Tensor, hidden_ND: torch.Tensor) -> torch.Tensor:
    """The head in the dtype of the rows it projects (bf16 under autocast; else unchanged).

    Differentiable: a float32 master head receives its gradient in float32."""
    return head_VD if head_VD.dtype == hidden_ND.dtype else head_VD.to(hidden_ND.dtype)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Per-layer activation checkpointing of a Hugging Face model (also behind a PEFT wrapper).

    Non-reentrant `torch.utils.checkpoint` (PyTorch's recommended mode): it needs no input
    that requires grad, so LoRA adapters behind frozen embeddings get their gradients."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"train.gradient_checkpointing=true: {type(base).__name__} does not support "
            "gradient checkpointing; set train.gradient_checkpointing=false"
        )
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 (the new name)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def setup_student(models, cfg, log=print) -> None:
    """The run's student as configured: LoRA-wrapped (`model.lora_r`), gradient checkpointing
    (`train.gradient_checkpointing`), and `train.precision` checked against its weights."""
    from opd.models.lora import apply_lora, trainable_count

    m, tc = cfg.model, cfg.train
    models.student = apply_lora(
        models.student, m.lora_r, m.lora_alpha, m.lora_targets, m.lora_dropout
    )
    if m.lora_r:
        if not m.student:  # pruned from the teacher: the adapter's base is no folder on disk
            for peft_cfg in models.student.peft_config.values():
                peft_cfg.base_model_name_or_path = None
        trainable, total = trainable_count(models.student)
        log(
            f"LoRA r={m.lora_r}, alpha={m.lora_alpha:g} on {m.lora_targets}: {trainable:,} of "
            f"{total:,} student parameters trainable"
        )
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(models.student)
    check_precision(tc.precision, models.student)
    if tc.bf16_logits and tc.precision != "bf16":
        raise ConfigError(
            f"train.bf16_logits=true narrows the logits of a bf16 run, but train.precision="
            f"{tc.precision}; set train.precision=bf16 or drop train.bf16_logits"
        )
    if tc.precision == "bf16":
        heads = "bfloat16 (train.bf16_logits=true)" if tc.bf16_logits else (
            "float32 (train.bf16_logits=false, the default)")
        log(f"train.precision=bf16: decoders and rollouts under bfloat16 autocast, float32 "
            f"master weights; the heads' logits in {heads}")
    note = bf16_note(tc.precision, next(models.student.parameters()).device)
    if note:
        log(f"warning: {note}")
