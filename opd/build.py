"""Turn a `RunConfig` into the objects a run needs: models, tokenizer, prompt sets.

Shared by `opd distill`, `opd eval` and `opd demo`, so each resolves paths, vocabularies and
data the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.config import RunConfig
from opd.config_check import check_heldout_split
from opd.data import encode_rows, end_of_turn_ids, load_rows
from opd.errors import ConfigError
from opd.models import decoder_and_head, load_model, shared_vocab_size, student_from_teacher
from opd.stream import split_rows
from opd.teachers.ensemble import TeacherEnsemble

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Models:
    """Teacher, student and the tokenizer they share (plus the shared vocabulary size)."""

    teacher: torch.nn.Module
    student: torch.nn.Module
    tokenizer: object
    vocab_size: int = 0

    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return int(pid if pid is not None else self.tokenizer.eos_token_id)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(end_of_turn_ids(self.tokenizer))


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(
            f"model.device: not a device: {spec!r} (valid: auto, cpu, cuda, cuda:0)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device: 'cuda' was asked for but no CUDA device is available")
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
    """Load the teacher(s) and the student (or prune one from the teacher); check vocabularies."""
    dtype = DTYPES[cfg.model.dtype]
    device = resolve_device(cfg.model.device)
    specs = [x.strip() for x in cfg.model.teacher.split(",") if x.strip()]
    if not specs:
        raise ConfigError("model.teacher: empty; give 'embedded', a folder or a .gguf file")
    loaded = [load_model(spec, dtype=dtype, device=device) for spec in specs]
    teacher, tok = loaded[0]
    if cfg.model.student:
        student, stok = load_model(cfg.model.student, dtype=dtype, device=device)
    else:
        student, stok = student_from_teacher(teacher, layers=cfg.model.student_layers), tok
    if len(loaded) > 1:
        for member, mtok in loaded[1:]:
            shared_vocab_size(student, stok, member, mtok)  # each member must share the vocabulary
        weights = _parse_weights(cfg.model.teacher_weights, len(loaded))
        teacher = TeacherEnsemble([m for m, _ in loaded], weights)
    elif cfg.model.teacher_weights:
        raise ConfigError("model.teacher_weights: set, but model.teacher names only one teacher")
    return finish_models(teacher, student, tok, stok)


def finish_models(teacher, student, tok, student_tok=None) -> Models:
    """Freeze the teacher(s), check vocabularies, and bundle the pair."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    members = list(teacher.members) if isinstance(teacher, TeacherEnsemble) else [teacher]
    for model in (*members, student):  # fail now, not at step 1, if logits are post-processed
        decoder_and_head(model, verify=True)
    vocab = min(shared_vocab_size(student, student_tok or tok, m, tok) for m in members)
    return Models(teacher=teacher, student=student, tokenizer=tok, vocab_size=vocab)


def _rows_from_spec(spec: str, skip_bad_rows: bool, default_split: str):
    """'task:NAME[:split]' (a shipped task) or a file path -> (rows, task or None)."""
    if spec.startswith("task:"):
        from opd.tasks import get_task, shipped_path

        parts = spec.split(":")
        name = parts[1]
        split = parts[2] if len(parts) > 2 else default_split
        task = get_task(name)
        return load_rows(shipped_path(name, split), skip_bad_rows=skip_bad_rows), task
    return load_rows(spec, skip_bad_rows=skip_bad_rows), None


@dataclass
class PromptSets:
    train: list  # of opd.data.Example
    eval: list
    task: object | None  # an opd.tasks.Task when the data is a shipped task (its verifier)
    truncated: int = 0
    skipped: int = 0  # malformed rows skipped under data.skip_bad_rows
    skipped_examples: list = None


def build_data(cfg: RunConfig, tokenizer, *, need_train: bool = True) -> PromptSets:
    d = cfg.data
    chat = {"auto": "auto", "true": True, "false": False}[d.chat_template]
    enc_kw = dict(
        max_prompt_tokens=d.max_prompt_tokens,
        truncation=d.truncation,
        use_chat_template=chat,
        system_prompt=d.system_prompt or None,
    )
    train_rows, task, skipped, examples = [], None, 0, []
    if need_train or not d.eval:
        loaded, task = _rows_from_spec(d.train, d.skip_bad_rows, "train")
        train_rows, skipped, examples = loaded.rows, loaded.skipped, list(loaded.skipped_examples)
    if d.eval:
        loaded, eval_task = _rows_from_spec(d.eval, d.skip_bad_rows, "test")
        eval_rows, task = loaded.rows, task or eval_task
        skipped += loaded.skipped
        examples += loaded.skipped_examples
    else:
        check_heldout_split(cfg, len(train_rows))
        train_rows, eval_rows = split_rows(train_rows, eval_count=d.eval_count, seed=cfg.train.seed)
    eval_rows = eval_rows[: d.eval_count]
    train_enc = encode_rows(train_rows, tokenizer, **enc_kw) if train_rows else None
    eval_enc = encode_rows(eval_rows, tokenizer, **enc_kw) if eval_rows else None
    return PromptSets(
        train=list(train_enc.examples) if train_enc else [],
        eval=list(eval_enc.examples) if eval_enc else [],
        task=task,
        truncated=(train_enc.truncated if train_enc else 0)
        + (eval_enc.truncated if eval_enc else 0),
        skipped=skipped,
        skipped_examples=examples[:5],
    )
