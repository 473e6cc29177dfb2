"""The library's high-level entry point: a `Method`, models and data in, a trained student out.

    from opd import Distiller
    from opd.recipes import get_recipe

    result = Distiller(
        get_recipe("on_policy_rkl").build(),        # or any Method, or a recipe name
        teacher=teacher, student=student, tokenizer=tokenizer,
        train=["3+4=", {"prompt": "5+1=", "answer": "6"}],
        eval=None,                                  # None: held out from `train`; []: none
        output_dir="runs/mine", steps=100, lr=1e-4, batch_size=8,
    ).train()                                       # -> opd.train.RunResult

Options are the config keys of `opd distill --help-config`, as `section.field` or, when
unambiguous, the bare field (`steps`, `lr`, `max_new_tokens`), checked like the CLI's
overrides. Rows are prompt strings or dicts in the data-file schema (`prompt` or `messages`,
optional `completion` and `answer`). The models are checked like the CLI's (shared
vocabulary, computed; plain linear heads); a run folder is created only after everything
is checked. Errors are `opd.errors.OpdError` subclasses with one-line messages.
"""

from __future__ import annotations

from opd.build import PromptSets, finish_models
from opd.config import load_config
from opd.data import encode_rows, parse_row
from opd.data.sets import encode_options, holdout
from opd.errors import ConfigError, DataError
from opd.method import Method


def _rows(items, name: str) -> list:
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise DataError(
            f"{name}: expected a list of prompts or row dicts, got {type(items).__name__}"
        )
    rows = []
    for i, item in enumerate(items):
        obj = {"prompt": item} if isinstance(item, str) else item
        rows.append(parse_row(obj, f"{name}[{i}]"))
    return rows


def _override(key: str, value) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"{key}={value}"


class Distiller:
    """Distill `student` from `teacher` with `method` on `train` prompts (module docstring).

    Args:
      method: an `opd.method.Method`, or a recipe name (`opd recipes` lists them).
      teacher, student: causal LMs (the teacher is frozen; an `opd.teachers.ensemble
        .TeacherEnsemble` also works); tokenizer: the tokenizer both share.
      train: prompts (strings) or row dicts; at least one.
      eval: held-out prompts or rows; None holds out `data.eval_count` rows of `train`;
        an empty list evaluates nothing.
      output_dir: the run folder (empty: runs/<recipe>-<timestamp>).
      log: where one-line status messages go (default print).
      **options: config keys, e.g. steps=100, lr=1e-4, batch_size=8, max_new_tokens=32.
    """

    def __init__(
        self,
        method,
        *,
        teacher,
        student,
        tokenizer,
        train,
        eval=None,
        output_dir: str = "",
        log=print,
        **options,
    ):
        if isinstance(method, str):
            from opd.recipes import get_recipe

            method = get_recipe(method).build()
        if not isinstance(method, Method):
            raise ConfigError(
                f"method: expected an opd.method.Method or a recipe name, got "
                f"{type(method).__name__}"
            )
        overrides = [_override(k, v) for k, v in options.items()]
        if output_dir:
            overrides.append(f"output_dir={output_dir}")
        self.cfg = load_config(None, overrides)
        self.cfg.method.recipe = method.name
        self.models = finish_models(teacher, student, tokenizer)
        self.method, self.log = method, log
        self.data = self._encode(train, eval)

    def _encode(self, train, eval) -> PromptSets:
        d = self.cfg.data
        train_rows = _rows(train, "train")
        if not train_rows:
            raise DataError("train: no prompts (valid: a non-empty list)")
        n = len(train_rows)
        if eval is None and d.eval_count:
            train_rows, eval_rows, why = holdout(train_rows, d.eval_count, self.cfg.train.seed)
            eval_line = f"eval: held out from train=... ({why})" if eval_rows else "eval: none"
        elif eval is None:
            eval_rows, eval_line = [], "eval: none (data.eval_count=0)"
        else:
            eval_rows = _rows(eval, "eval")[: d.eval_count]
            eval_line = f"eval: given in code ({len(eval_rows)} rows)"
        train_line = f"train: given in code ({len(train_rows)} of {n} rows)"
        kw = encode_options(d)
        tok = self.models.tokenizer
        tr = encode_rows(train_rows, tok, **kw)
        ev = encode_rows(eval_rows, tok, **kw) if eval_rows else None
        return PromptSets(
            train=list(tr.examples),
            eval=list(ev.examples) if ev else [],
            task=None,
            truncated=tr.truncated + (ev.truncated if ev else 0),
            sources=[train_line, eval_line],
        )

    def train(self, *, resume: bool = False, stop_after: int | None = None):
        """Run the distillation; returns `opd.train.RunResult` (losses, metrics, models)."""
        from opd.train import distill

        return distill(
            self.cfg,
            models=self.models,
            method=self.method,
            data=self.data,
            resume=resume,
            stop_after=stop_after,
            log=self.log,
        )
