"""OVD's verbal judge: the teacher grades each student completion with a score from 0 to 9.

For every student completion y of prompt x the teacher greedily answers the judge prompt
`template.format(question=x, answer=y)` (`DEFAULT_JUDGE_TEMPLATE`, overridable) with a few
tokens: a local model continues it (wrapped in the tokenizer's chat template when it has one);
a chat endpoint (`opd.teachers.chat.ChatTeacher.judge`) gets it as one user turn at τ = 0.
The score s is the first digit 0–9 in the judge's text; the reward is

    r = s / 9                      ∈ [0, 1]
    r = neutral (0.5)              when the text has no digit (a bad parse, e.g. "nine", "")

Bad parses are counted (`ovd_bad_parses`, per micro-batch, via ctx.log) and never stop the
run. The rewards go to the GRPO core (`opd.rl.grpo`): G completions per prompt, group-normalised
advantages A_i = (r_i − mean_g r)/(std_g r + ε), per-token loss −min(ρ·A, clip(ρ)·A) with
π_old = π_θ (one update per rollout). The teacher is only asked to write: never for log-probs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from opd.errors import ConfigError
from opd.rl.grpo import SCALES, group_advantages, grpo_token_loss
from opd.signals.tokens import student_token_logprobs
from opd.types import TeacherScores

DEFAULT_JUDGE_TEMPLATE = (
    "You are grading an answer to a question. Rate it from 0 (wrong or useless) to 9 "
    "(correct and complete). Reply with a single digit.\n\n"
    "Question: {question}\n\nAnswer: {answer}\n\nScore (0-9):"
)
NEUTRAL = 0.5
_DIGIT = re.compile(r"[0-9]")


def parse_score(text: str) -> int | None:
    """The first digit 0–9 in the judge's `text`, or None (a bad parse)."""
    match = _DIGIT.search(text or "")
    return None if match is None else int(match.group())


def scores_to_rewards(scores: list[int | None], neutral: float = NEUTRAL) -> tuple[Tensor, int]:
    """((B,) rewards s/9, neutral where unparsed; the number of bad parses)."""
    rewards = [neutral if s is None else s / 9.0 for s in scores]
    return torch.tensor(rewards, dtype=torch.float64), sum(s is None for s in scores)


def check_template(template: str) -> str:
    """`template` if it formats with exactly {question} and {answer}, else a ConfigError."""
    try:
        template.format(question="q", answer="a")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"method.args.judge_template does not format ({type(err).__name__}: {err}); valid: "
            "text with the fields {question} and {answer} (write literal braces as {{ }})"
        ) from None
    missing = [f for f in ("{question}", "{answer}") if f not in template]
    if missing:
        raise ConfigError(
            f"method.args.judge_template lacks {' and '.join(missing)}; valid: text with "
            "the fields {question} and {answer}"
        )
    return template


@dataclass(frozen=True)
class TextOnly:
    """Black-box teacher access: asks the teacher for no scores; `needs` says it must write."""

    provides: frozenset = frozenset()
    needs: frozenset = frozenset({"text"})

    def score(self, teacher, rollout, vocab_size: int) -> TeacherScores:
        return TeacherScores()

    def describe(self) -> str:
        return "text only (black-box: the teacher writes, it is never asked for log-probs)"


def _question(rollout, b: int, tokenizer) -> str:
    raw = rollout.raw_prompts[b] if b < len(rollout.raw_prompts) else None
    if isinstance(raw, str):
        return raw
    if raw:  # chat turns as ((key, value), ...) pairs: the last user turn
        users = [dict(t)["content"] for t in raw if dict(t).get("role") == "user"]
        if users:
            return users[-1]
    P = rollout.prompt_len
    ids = rollout.input_ids_BL[b, :P][rollout.attention_mask_BL[b, :P].bool()]
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def _encode(text: str, tokenizer) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        from opd.data.encode import _as_ids

        turns = [{"role": "user", "content": text}]
        return _as_ids(
            tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True)
        )
    return list(tokenizer(text, add_special_tokens=True).input_ids)


@torch.no_grad()
def judge_texts(rollout, ctx, template: str, max_new_tokens: int) -> list[str]:
    """The teacher's greedy judge outputs for each row of `rollout` (module doc)."""
    from opd.sampling import GenerationParams
    from opd.teachers.chat import text_teacher

    chat = text_teacher(ctx) if ctx.teacher is None else None  # [black-box] a chat endpoint
    if ctx.teacher is None and chat is None:
        raise ConfigError(
            "ovd: the judge needs a teacher that writes text (a local model: model.teacher="
            "PATH, or a chat endpoint: model.teacher_api=openai-chat); a log-prob server does not"
        )
    tok = ctx.tokenizer
    mask_BT = rollout.completion_mask_BT.bool()
    texts = []
    for b in range(rollout.completion_ids_BT.shape[0]):
        answer = tok.decode(
            rollout.completion_ids_BT[b][mask_BT[b]].tolist(), skip_special_tokens=True
        )
        texts.append(template.format(question=_question(rollout, b, tok), answer=answer))
    if chat is not None:  # one user turn each; the endpoint applies its own chat template
        return chat.judge(texts, max_new_tokens)
    prompts = [_encode(text, tok) for text in texts]
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)
    outs = ctx.backend.generate(
        ctx.teacher, prompts, params, pad_id=ctx.pad_id, stop_ids=ctx.stop_ids
    )
    return [tok.decode(o, skip_special_tokens=True) for o in outs]


@dataclass(frozen=True)
class OVD:
    """GRPO with the teacher's verbal 0–9 judge scores as rewards (module doc).

    Attributes:
      group_size: G, the rows of each group (the prefix source writes G per prompt).
      scale: "std" (GRPO) or "none" (Dr. GRPO) advantages.
      judge_template: the judge prompt, with {question} and {answer}.
      judge_max_new_tokens: how many tokens the judge may write.
      neutral: the reward of a bad parse.
      eps_low, eps_high: the clip band (eps_high 0: = eps_low).
    """

    group_size: int = 4
    scale: str = "std"
    judge_template: str = DEFAULT_JUDGE_TEMPLATE
    judge_max_new_tokens: int = 4
    neutral: float = NEUTRAL
    eps_low: float = 0.2
    eps_high: float = 0.0
    requires: ClassVar[frozenset] = frozenset()
    logs: ClassVar[frozenset] = frozenset({"reward_mean", "ovd_bad_parses", "ovd_score_mean"})

    def __post_init__(self):
        if self.scale not in SCALES:
            raise ConfigError(f"ovd: scale {self.scale!r}; valid: {', '.join(SCALES)}")
        if self.group_size < 1 or self.judge_max_new_tokens < 1:
            raise ConfigError("ovd: group_size and judge_max_new_tokens must be >= 1")
        if self.eps_low < 0 or self.eps_high < 0:
            raise ConfigError("ovd: eps_low and eps_high must be >= 0")
        check_template(self.judge_template)

    def rewards(self, ctx) -> Tensor:
        """(B,) rewards of the rollout's rows from the judge; logs the counts."""
        texts = judge_texts(ctx.rollout, ctx, self.judge_template, self.judge_max_new_tokens)
        scores = [parse_score(t) for t in texts]
        R_B, bad = scores_to_rewards(scores, self.neutral)
        good = [s for s in scores if s is not None]
        ctx.log("ovd_bad_parses", bad)
        if good:
            ctx.log("ovd_score_mean", sum(good) / len(good))
        ctx.log("reward_mean", R_B.mean())
        return R_B

    def __call__(self, student, teacher, ctx) -> Tensor:
        if ctx.rollout is None:
            raise ConfigError("ovd needs ctx.rollout (the rows' completions) to judge them")
        logq_N = student_token_logprobs(student, ctx)
        R_B = self.rewards(ctx).to(device=logq_N.device, dtype=logq_N.dtype)
        A_B = group_advantages(R_B, self.group_size, self.scale)
        return grpo_token_loss(
            logq_N,
            logq_N.detach(),  # one update per rollout: π_old = π_θ
            A_B[student.row_index_N],
            eps_low=self.eps_low,
            eps_high=self.eps_high or None,
        )

    def describe(self) -> str:
        adv = "(r − mean)/(std + ε)" if self.scale == "std" else "r − mean (Dr. GRPO)"
        return (
            f"OVD: GRPO clipped surrogate, G={self.group_size}, A = {adv}, rewards: the "
            f"teacher's verbal 0–9 judge score / 9 (bad parse: {self.neutral})"
        )
