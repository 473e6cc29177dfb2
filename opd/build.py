"""Turn a `RunConfig` into the objects a run needs: models, tokenizer, prompt sets.

Shared by `opd distill`, `opd eval` and `opd demo`, so each resolves paths, vocabularies and
data the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.config import RunConfig
from opd.config_check import is_served
from opd.crosstok.models import (
    cross_tokenizer_models,
    is_cross_tokenizer,
    refusal,
    same_vocabulary,
)
from opd.data import end_of_turn_ids
from opd.data.sets import PromptSets, build_data  # noqa: F401 - re-exported: opd.build is the entry
from opd.errors import ConfigError
from opd.models import (
    check_head,
    decoder_and_head,
    load_model,
    load_tokenizer,
    num_decoder_layers,
    shared_vocab_size,
    student_from_teacher,
)
from opd.recipes import get_recipe
from opd.teachers.ensemble import TeacherEnsemble

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Models:
    """Teacher, student and the tokenizer they share (plus the shared vocabulary size).

    `teacher_tokenizer` ([crosstok]): the teacher's own tokenizer when it differs from the
    student's (`tokenizer` is then the student's); None = the teacher uses `tokenizer`.
    """

    teacher: object  # an nn.Module (or TeacherEnsemble), or a Teacher such as ServedTeacher
    student: torch.nn.Module
    tokenizer: object
    vocab_size: int = 0
    teacher_tokenizer: object = None

    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return int(pid if pid is not None else self.tokenizer.eos_token_id)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(end_of_turn_ids(self.tokenizer))


def resolve_device(spec: str) -> torch.device:
    """``model.device``: 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:i' or 'mps'."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    valid = "valid: auto, cpu, cuda, cuda:0, mps"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"model.device: not a device: {spec!r} ({valid})") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"model.device={spec}: no CUDA device is available (use model.device=cpu or auto)"
            )
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"model.device={spec}: only {count} CUDA device(s), so the index must be in "
                f"[0, {count - 1}]"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"model.device={spec}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ConfigError(f"model.device: {spec!r} is not supported ({valid})")
    return dev


def _parse_weights(text: str, k: int) -> list[float] | None:
    if not text:
        return None
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"model.teacher_weights: expected comma-separated numbers, got {text!r}"
        ) from None
    if len(weights) != k:
        raise ConfigError(f"model.teacher_weights: {len(weights)} weights for {k} teachers")
    return weights


def build_models(cfg: RunConfig) -> Models:
    """Load the teacher(s) and the student (or prune one from the teacher); check vocabularies.

    Each model is checked as soon as it is loaded (`check_head`), so errors name its path.
    """
    dtype = DTYPES[cfg.model.dtype]
    device = resolve_device(cfg.model.device)
    if is_served(cfg.model.teacher):
        return _served_models(cfg, dtype, device)
    if cfg.model.teacher_api == "openai-chat":  # [black-box] not a URL: say so, never go local
        raise ConfigError(
            f"model.teacher_api=openai-chat needs model.teacher=http(s)://HOST:PORT/v1 (a chat "
            f"endpoint), got {cfg.model.teacher!r}"
        )
    if cfg.model.teacher.strip().startswith("cache:"):  # an offline teacher cache
        from opd.teachers.cache import NO_STUDENT, cached_models

        return cached_models(cfg, _given_student(cfg, dtype, device, NO_STUDENT))
    if cfg.model.teacher.strip() == SELF:
        return _self_models(cfg, dtype, device)
    specs = [x.strip() for x in cfg.model.teacher.split(",") if x.strip()]
    if not specs:
        raise ConfigError(
            "model.teacher: empty; give 'embedded', a folder, a .gguf file or a Hub id (org/name)"
        )
    weights = _parse_weights(cfg.model.teacher_weights, len(specs)) if len(specs) > 1 else None
    if len(specs) == 1 and cfg.model.teacher_weights:
        raise ConfigError("model.teacher_weights: set, but model.teacher names only one teacher")

    def load(spec):
        model, tok = load_model(
            spec, dtype=dtype, device=device, allow_download=cfg.model.allow_download
        )
        check_head(model, spec)
        return model, tok

    loaded = [load(spec) for spec in specs]
    teacher, tok = loaded[0]
    if cfg.model.student:
        student, stok = load(cfg.model.student)
        student = _pruned_given_student(student, cfg)
    else:
        student, stok = _pruned_student(teacher, cfg.model.student_layers, specs[0]), tok
    if cfg.model.student and not same_vocabulary(stok, tok):  # [crosstok] opd.crosstok.models
        method = get_recipe(cfg.method.recipe).build(**cfg.method.args)
        return cross_tokenizer_models(cfg, method, teacher, student, stok, tok, len(loaded) > 1)
    if len(loaded) > 1:
        for member, mtok in loaded[1:]:
            shared_vocab_size(student, stok, member, mtok)  # each member must share the vocabulary
        teacher = TeacherEnsemble([m for m, _ in loaded], weights)
    return finish_models(teacher, student, tok, stok)


def served_teacher(cfg: RunConfig):
    """The `ServedTeacher` that `model.teacher=http://...` and the `model.teacher_*` keys name."""
    from opd.teachers.served import ServedTeacher

    m = cfg.model
    if m.teacher_api == "openai-chat":  # [black-box] a text-only chat endpoint
        from opd.teachers.chat import chat_teacher

        return chat_teacher(m)
    if "," in m.teacher:
        raise ConfigError(
            f"model.teacher={m.teacher!r}: a served teacher cannot be part of an ensemble "
            "(serve the ensemble instead: opd serve-teacher A,B)"
        )
    return ServedTeacher(
        m.teacher.strip(),
        api=m.teacher_api,
        model=m.teacher_model or None,
        concurrency=m.teacher_concurrency,
        batch_tokens=m.teacher_batch_tokens,
        timeout_s=m.teacher_timeout,
        retries=m.teacher_retries,
        token_env=m.teacher_token_env or None,
    )


def _given_student(cfg: RunConfig, dtype, device, missing: str):
    """The student `model.student` names (pruned by `model.student_prune_to`), for runs whose
    teacher is not a local model; `missing` is the error when no student is given."""
    if not cfg.model.student:
        raise ConfigError(missing)
    if cfg.model.teacher_weights:
        raise ConfigError("model.teacher_weights: only for an ensemble of local teachers")
    student, tok = load_model(
        cfg.model.student, dtype=dtype, device=device, allow_download=cfg.model.allow_download
    )
    check_head(student, cfg.model.student)
    return _pruned_given_student(student, cfg), tok


def _served_models(cfg: RunConfig, dtype, device) -> Models:
    """A served teacher and a local student; the server's tokenizer must be the student's."""
    student, tok = _given_student(
        cfg,
        dtype,
        device,
        f"model.student: required with a served teacher ({cfg.model.teacher}): a student "
        "cannot be pruned from a model in another process; give a folder or .gguf file",
    )
    teacher = served_teacher(cfg)
    ttok = load_tokenizer(cfg.model.teacher_tokenizer) if cfg.model.teacher_tokenizer else tok
    teacher.check_tokenizer(ttok)  # refused before anything is trained
    if not same_vocabulary(tok, ttok):  # a served teacher of another tokenizer: xtok recipes
        method = get_recipe(cfg.method.recipe).build(**cfg.method.args)
        if not is_cross_tokenizer(method):
            raise refusal(cfg.model.student, cfg.model.teacher, method.name, tok, ttok)
        decoder_and_head(student, verify=True)
        vocab = shared_vocab_size(student, tok, student, tok)
        return Models(teacher, student, tok, vocab, teacher_tokenizer=ttok)
    return finish_models(teacher, student, tok)


SELF = "self"
"""[self-distillation] `model.teacher=self`: no external teacher (see `_self_models`)."""


def _self_models(cfg: RunConfig, dtype, device) -> Models:
    """[self-distillation] `model.teacher=self`: only the student is loaded and
    `Models.teacher` IS the student (not frozen), for recipes whose teacher is a view of the
    student (`opd.selfdistill`) or that have none (`grpo`); `run_setup` refuses any other
    recipe. The held-out KL is then 0 and the report's teacher row is the trained student."""
    student, tok = _given_student(
        cfg,
        dtype,
        device,
        "model.teacher=self: give model.student (the model that teaches itself: a folder, "
        ".gguf file, Hub id or 'embedded')",
    )
    student.train()
    decoder_and_head(student, verify=True)
    vocab = shared_vocab_size(student, tok, student, tok)
    return Models(teacher=student, student=student, tokenizer=tok, vocab_size=vocab)


def _pruned_given_student(student, cfg: RunConfig):
    """``model.student_prune_to=n``: keep n evenly spaced layers of the loaded student."""
    n = cfg.model.student_prune_to
    if not n:
        return student
    total = num_decoder_layers(student)
    if n > total:
        raise ConfigError(
            f"model.student_prune_to={n}: the student '{cfg.model.student}' has only {total} "
            f"decoder layers (valid: 1..{total}, or 0 to keep all)"
        )
    return student_from_teacher(student, n, option="model.student_prune_to")


def _pruned_student(teacher, layers: int, teacher_spec: str):
    """``model.student`` unset: keep ``model.student_layers`` evenly spaced teacher layers."""
    total = num_decoder_layers(teacher)
    if not 1 <= layers <= total:
        raise ConfigError(
            f"model.student_layers={layers} is out of range: model.student is not set, so the "
            f"student is pruned from the teacher '{teacher_spec}', which has {total} decoder "
            f"layers; set model.student_layers in [1, {total}] or give model.student=PATH"
        )
    return student_from_teacher(teacher, layers, option="model.student_layers")


def finish_models(teacher, student, tok, student_tok=None) -> Models:
    """Freeze the teacher(s), check heads and vocabularies, and bundle the pair."""
    if not isinstance(teacher, torch.nn.Module):  # served: the server checked its tokenizer
        student.train()
        decoder_and_head(student, verify=True)
        vocab = shared_vocab_size(student, student_tok or tok, student, student_tok or tok)
        return Models(teacher=teacher, student=student, tokenizer=tok, vocab_size=vocab)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    members = list(teacher.members) if isinstance(teacher, TeacherEnsemble) else [teacher]
    for model in (*members, student):  # fail now, not at step 1: a biased or processed head
        decoder_and_head(model, verify=True)
    vocab = min(shared_vocab_size(student, student_tok or tok, m, tok) for m in members)
    return Models(teacher=teacher, student=student, tokenizer=tok, vocab_size=vocab)
