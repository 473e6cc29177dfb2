"""Privileged context: the prompt a self-teacher sees.

The teacher's prompt is the student's prompt with privileged text added by a template
(default `TEMPLATE` = "{prompt}\n\n{context}"):

    plain prompt   teacher text = template.format(prompt=row.prompt, context=text)
    chat rows      the template is applied to the LAST user turn's content, before the chat
                   template renders the turns (system prompt and generation prompt as for the
                   student), so the privileged text stays inside the user's turn

`text` is the row's field named by the recipe (`context`, `solution`, `feedback`,
`demonstration`, see `opd.data.rows.PRIVILEGED_FIELDS`) or a constant given by the recipe
(e.g. a "be concise" instruction). An EMPTY text leaves the prompt unchanged (the teacher
sees exactly the student's prompt), so a `live` self-teacher with empty context is the
student itself. A row without the field is a `DataError` naming the row and the field,
raised before training (`PrivilegedPrompts.check_data`).

The teacher's prompt is rendered exactly like the student's (`opd.data.encode.render_prompt`)
and left-truncated to 2 × data.max_prompt_tokens. Deviation: a teacher prompt that long loses
its start (template header included), as a student prompt over its budget does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from opd.data.encode import render_prompt
from opd.data.rows import PRIVILEGED_FIELDS
from opd.errors import ConfigError, DataError

TEMPLATE = "{prompt}\n\n{context}"
"""The default teacher-prompt template (fields: {prompt}, {context})."""


def check_template(template: str) -> None:
    """ConfigError unless `template` formats with exactly the fields {prompt} and {context}."""
    try:
        out = template.format(prompt="\0p", context="\0c")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"teacher template {template!r} does not format ({type(err).__name__}: {err}); "
            "valid: text with the fields {prompt} and {context}, e.g. '{prompt}\\n\\n{context}'"
        ) from None
    if "\0p" not in out or "\0c" not in out:
        raise ConfigError(
            f"teacher template {template!r} must contain both {{prompt}} and {{context}}"
        )


def check_field(name: str | None) -> None:
    if name is not None and name not in PRIVILEGED_FIELDS:
        raise ConfigError(
            f"privileged field {name!r} is not a row field a teacher can see; valid: "
            f"{', '.join(PRIVILEGED_FIELDS)}"
        )


def privileged_text(example, field: str | None, constant: str | None, who: str) -> str:
    """The privileged text for `example`: the constant, or its row field (DataError if absent)."""
    if field is None:
        return constant or ""
    fields = getattr(example, "privileged", None) or {}
    if field not in fields:
        have = ", ".join(sorted(fields)) or "none"
        raise DataError(
            f"{example.source}: row has no field '{field}', which {who} shows the teacher "
            f"(privileged fields present: {have}; valid: add '{field}' to every training row)"
        )
    return fields[field]


def teacher_prompt_ids(example, text: str, tokenizer, template: str = TEMPLATE) -> tuple[int, ...]:
    """The ids of `example`'s prompt with `text` added by `template` (see module doc)."""
    if not text:
        return tuple(example.prompt_ids)
    view = example.view
    if view is None:
        raise DataError(
            f"{example.source}: this example was not encoded by opd.data.encode_rows, so its "
            "teacher prompt cannot be rendered (build examples with encode_rows)"
        )
    row = view.row
    if view.chat:
        turns = [dict(t) for t in (row.messages or [{"role": "user", "content": row.prompt}])]
        users = [i for i, t in enumerate(turns) if t["role"] == "user"]
        i = users[-1] if users else len(turns) - 1
        turns[i]["content"] = template.format(prompt=turns[i]["content"], context=text)
        row = dataclasses.replace(row, prompt=None, messages=tuple(turns))
    else:
        row = dataclasses.replace(row, prompt=template.format(prompt=row.prompt, context=text))
    return tuple(render_prompt(view, row, tokenizer))


@dataclass(frozen=True)
class PrivilegedPrompts:
    """A prefix source wrapper: `inner` writes the rollout; each row gets its teacher prompt
    (`Rollout.teacher_prompts`). Rows beyond the examples (G samples per prompt, in example
    order: rows b·G .. b·G + G − 1 belong to example b) repeat their example's prompt.

    Attributes:
      inner: the prefix source that writes the completions (e.g. `opd.sampling.student()`).
      field: the row field holding the privileged text; None: use `constant`.
      constant: the same privileged text for every row (when `field` is None).
      template: how the text joins the prompt (fields {prompt}, {context}).
      who: how errors name the part that needs the field (e.g. "recipe 'opsd'").
    """

    inner: object
    field: str | None = "context"
    constant: str | None = None
    template: str = TEMPLATE
    who: str = "the self-teacher"

    def __post_init__(self):
        check_field(self.field)
        check_template(self.template)

    @property
    def needs_completions(self) -> bool:
        return self.inner.needs_completions

    @property
    def needs_teacher_model(self) -> bool:
        return self.inner.needs_teacher_model

    def check_data(self, examples: Sequence) -> None:
        """DataError naming the first row without the privileged field (before training)."""
        for ex in examples:
            privileged_text(ex, self.field, self.constant, self.who)

    def rollout(self, examples, ctx):
        rollout = self.inner.rollout(examples, ctx)
        prompts = [
            teacher_prompt_ids(
                ex,
                privileged_text(ex, self.field, self.constant, self.who),
                ctx.tokenizer,
                self.template,
            )
            for ex in examples
        ]
        B = rollout.input_ids_BL.shape[0]
        if B % len(prompts):
            raise ValueError(f"{B} rollout rows for {len(prompts)} examples")
        per = B // len(prompts)
        rows = tuple(p for p in prompts for _ in range(per))
        return dataclasses.replace(rollout, teacher_prompts=rows)

    def describe(self) -> str:
        what = f"the row's '{self.field}'" if self.field else repr(self.constant)
        return f"{self.inner.describe()}; the self-teacher's prompt adds {what}"
