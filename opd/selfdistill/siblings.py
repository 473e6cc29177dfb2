"""SDPO's "successful sibling" teacher prompt: the self-teacher is shown a sibling completion
of the same group that earned reward ≥ 1.

The inner prefix source writes G completions per prompt (rows b·G .. b·G + G − 1 answer
example b, `opd.rl.parts.Grouped`). Each completion is rewarded as the GRPO core does
(`opd.rl.grpo.rollout_rewards`: the task's verifier, or `reward` by import path). For row i,
the sibling is the FIRST row j ≠ i of its group (in row order) with r_j ≥ 1; the teacher's
privileged text is then

    text_i = feedback + "\n\n" + SIBLING_HEADER + decode(y_j)     (feedback omitted if absent)

and the teacher prompt is `template.format(prompt=x, context=text_i)` (`opd.selfdistill
.context`, chat aware). A row with no successful sibling gets the feedback alone, and with
no feedback either the student's own prompt (empty text). The row's feedback field is
optional here (a sibling can stand in for it), so no row is refused for lacking it.
Rewards are computed again by the GRPO signal (the same values: verifier or a pure reward
function).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from opd.errors import ConfigError
from opd.rl.grpo import load_reward_fn, rollout_rewards
from opd.selfdistill.context import TEMPLATE, check_field, check_template, teacher_prompt_ids

SIBLING_HEADER = "A correct solution:\n"


def sibling_index(rewards: list[float], group_size: int) -> list[int | None]:
    """For each row, the first other row of its group with reward ≥ 1, or None."""
    out = []
    for i in range(len(rewards)):
        start = i - i % group_size
        group = range(start, start + group_size)
        out.append(next((j for j in group if j != i and rewards[j] >= 1.0), None))
    return out


def completion_texts(rollout, tokenizer) -> list[str]:
    mask_BT = rollout.completion_mask_BT.bool()
    ids_BT = rollout.completion_ids_BT
    return [
        tokenizer.decode(ids_BT[b][mask_BT[b]].tolist(), skip_special_tokens=True)
        for b in range(len(ids_BT))
    ]


@dataclass(frozen=True)
class SiblingPrompts:
    """A prefix source wrapper: the self-teacher also sees a sibling with reward >= 1 (SDPO)."""

    inner: object
    group_size: int = 4
    field: str | None = "feedback"
    template: str = TEMPLATE
    reward: str = ""
    who: str = "recipe 'sdpo'"
    _cache: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        check_field(self.field or None)
        check_template(self.template)
        if self.group_size < 2:
            raise ConfigError(f"{self.who}: a successful sibling needs group_size >= 2")
        if self.reward:
            self._cache["reward"] = load_reward_fn(self.reward)

    @property
    def needs_completions(self) -> bool:
        return self.inner.needs_completions

    @property
    def needs_teacher_model(self) -> bool:
        return self.inner.needs_teacher_model

    def rollout(self, examples, ctx):
        rollout = self.inner.rollout(examples, ctx)
        B, G = rollout.input_ids_BL.shape[0], self.group_size
        if B != len(examples) * G:
            raise ValueError(f"{B} rollout rows for {len(examples)} examples × G={G}")
        rewards = rollout_rewards(rollout, ctx, self._cache.get("reward")).tolist()
        texts = completion_texts(rollout, ctx.tokenizer)
        prompts = []
        for i, j in enumerate(sibling_index(rewards, G)):
            ex = examples[i // G]
            fields = getattr(ex, "privileged", None) or {}
            parts = [str(fields[self.field])] if self.field and fields.get(self.field) else []
            if j is not None:
                parts.append(SIBLING_HEADER + texts[j])
            text = "\n\n".join(parts)
            prompts.append(teacher_prompt_ids(ex, text, ctx.tokenizer, self.template))
        return dataclasses.replace(rollout, teacher_prompts=tuple(prompts))

    def describe(self) -> str:
        what = f"the row's '{self.field}' (if any) and " if self.field else ""
        return (
            f"{self.inner.describe()}; the self-teacher's prompt adds {what}a successful "
            "sibling's completion (reward >= 1)"
        )
