"""Lion's adversarial loop as a prompt pool that grows each round (Jiang et al., 2023).

One run, in rounds of `round_steps` optimizer steps:

    imitate        every step draws `train.batch_size` instructions uniformly (with
                   replacement, torch's global RNG: restored on resume) from the pool; the
                   teacher writes the responses and the student learns them by −log q_student
                   (`opd.sampling.teacher()` + `opd.blackbox.TextNLL`; text only)
    discriminate   at the first step of each new round, the newest `judge_count` instructions
                   of the pool are answered greedily by the student; an instruction is HARD when
                     - it has a reference answer (judge "auto" or "verifier"): the task's
                       verifier rejects the student's answer, or
                     - otherwise (judge "auto" or "teacher"): the teacher answers it greedily
                       and grades the student's answer against its own with a verbal 0–9 score
                       (`REFEREE_TEMPLATE`, first digit of its reply); hard when score <
                       `threshold`; a reply without a digit is not hard and is counted
    generate       `writer(hard, n, ctx)` returns up to n = `new_per_round` new instructions,
                   written from the hard ones; they join the pool (which only grows)

`writer` is an import path "package.module:function" called as
fn(hard: list[dict], n: int, ctx) -> list[dict]; each hard item has "prompt" (the
instruction's text), "answer" (or None) and "student" (the student's answer); each returned
item has "prompt" and optionally "answer" (then the verifier judges it in later rounds). The
default, `teacher_writes`, runs the teacher's `generate` on `WRITER_TEMPLATE` for each hard
instruction in turn (cycling when n exceeds them). New instructions are rendered like the
training rows (chat template and system prompt of the first training example's view).

State (checkpointed, JSON): rounds done, the added instructions (text, answer, token ids)
and a per-round history (judged, hard, added, bad referee replies).
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import torch

from opd.blackbox.imitation import TextNLL
from opd.blackbox.judge import _encode, parse_score
from opd.data.encode import Example
from opd.errors import ConfigError
from opd.teachers.base import teacher_model

WRITER_TEMPLATE = (
    "You write instructions for a student. Here is an instruction the student could not "
    "handle. Write ONE new instruction of the same kind and domain that is a little harder. "
    "Reply with the new instruction only.\n\n#Given Instruction#:\n{instruction}\n\n"
    "#New Instruction#:\n"
)
REFEREE_TEMPLATE = (
    "Compare an assistant's answer with a reference answer to the same question. Rate the "
    "assistant's answer from 0 (wrong or useless) to 9 (as good as the reference). Reply with "
    "a single digit.\n\nQuestion: {question}\n\nReference answer: {reference}\n\n"
    "Assistant's answer: {answer}\n\nScore (0-9):"
)
JUDGES = ("auto", "verifier", "teacher")
DEFAULT_WRITER = "opd.blackbox.lion:teacher_writes"


def load_writer(path: str):
    """The instruction writer named "package.module:function" (ConfigError otherwise)."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise ConfigError(f"lion: writer {path!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ConfigError(f"lion: writer {path!r}: cannot import {module!r} ({err})") from None
    except AttributeError:
        raise ConfigError(f"lion: writer {path!r}: module {module!r} has no {name!r}") from None
    if not callable(fn):
        raise ConfigError(f"lion: writer {path!r} is not callable")
    return fn


def _greedy(ctx, model, prompts, max_new_tokens: int) -> list[str]:
    from opd.sampling import GenerationParams

    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)
    with torch.no_grad():
        outs = ctx.backend.generate(
            model, prompts, params, pad_id=ctx.pad_id, stop_ids=ctx.stop_ids
        )
    return [ctx.tokenizer.decode(o, skip_special_tokens=True) for o in outs]


def _text_of(ex: Example) -> str:
    """The instruction's own text: the plain prompt, or the last user turn of a chat row."""
    raw = ex.raw_prompt
    if isinstance(raw, str):
        return raw
    users = [dict(t).get("content") for t in raw or () if dict(t).get("role") == "user"]
    return users[-1] if users and users[-1] is not None else ex.prompt_text


def teacher_writes(hard: list[dict], n: int, ctx) -> list[dict]:
    """The default writer: the teacher continues `WRITER_TEMPLATE` for each hard instruction
    in turn (sampled with the run's generation settings); empty replies are dropped."""
    if ctx.teacher is None:
        raise ConfigError("lion: the default writer needs a local teacher model that writes")
    asks = [WRITER_TEMPLATE.format(instruction=hard[i % len(hard)]["prompt"]) for i in range(n)]
    outs = ctx.generate(ctx.teacher, [_encode(a, ctx.tokenizer) for a in asks])
    texts = [ctx.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
    return [{"prompt": t} for t in texts if t]


class LionPool:
    """Lion's growing instruction pool as a prompt selector (module doc).

    Attributes:
      round_steps: optimizer steps per round (imitation between two discriminations).
      judge_count: the newest instructions of the pool judged each round.
      new_per_round: at most this many new instructions per round.
      judge: "auto", "verifier" (reference answers only) or "teacher" (the referee).
      threshold: a referee score below this marks an instruction hard.
      writer: the instruction writer's import path.
      max_new_tokens: tokens the student, the teacher and the referee may write when judging.
    """

    def __init__(
        self,
        round_steps: int = 50,
        judge_count: int = 16,
        new_per_round: int = 8,
        judge: str = "auto",
        threshold: int = 7,
        writer: str = DEFAULT_WRITER,
        max_new_tokens: int = 64,
    ):
        if round_steps < 1 or judge_count < 1 or new_per_round < 0 or max_new_tokens < 1:
            raise ConfigError(
                "lion: round_steps, judge_count and max_new_tokens must be >= 1, new_per_round >= 0"
            )
        if judge not in JUDGES:
            raise ConfigError(f"lion: judge {judge!r}; valid: {', '.join(JUDGES)}")
        if not 0 <= threshold <= 10:
            raise ConfigError(f"lion: threshold must be in 0..10, got {threshold}")
        self.round_steps, self.judge_count, self.new_per_round = (
            round_steps,
            judge_count,
            new_per_round,
        )
        self.judge, self.threshold, self.max_new_tokens = judge, threshold, max_new_tokens
        self.writer_path, self.writer = writer, load_writer(writer)  # a bad path fails now
        self.rounds = 0
        self.added: list[dict] = []  # {"prompt", "answer", "source", "ids"}
        self.history: list[dict] = []
        self._initial: list[Example] | None = None
        self._added_examples: list[Example] = []

    def check_teacher(self, teacher) -> None:
        """Before the run folder is made (`check_teacher_serves`), what a round would refuse
        later: the default writer and the teacher referee need a local teacher model."""
        if teacher_model(teacher) is not None:
            return
        if self.writer_path == DEFAULT_WRITER or self.judge == "teacher":
            what = "the default writer" if self.writer_path == DEFAULT_WRITER else "the referee"
            raise ConfigError(
                f"lion: {what} needs a local teacher model that writes; this teacher is not in "
                "this process (served or chat). Use a local model.teacher, or "
                "method.args.writer=package.module:function with method.args.judge=verifier"
            )

    # --- the pool ----------------------------------------------------------------------------------
    def pool(self, stream) -> list[Example]:
        if self._initial is None:
            self._initial = list(stream.examples)
        if len(self._added_examples) != len(self.added):
            self._added_examples = [self._example(r) for r in self.added]
        return self._initial + self._added_examples

    def _example(self, rec: dict) -> Example:
        ids = tuple(int(i) for i in rec["ids"])
        return Example(ids, None, rec.get("answer"), rec["source"], rec["prompt"], rec["prompt"])

    def _encode(self, text: str, tokenizer) -> list[int]:
        """`text` rendered like the training rows (the first example's view), else plain."""
        view = next((ex.view for ex in self._initial or () if ex.view is not None), None)
        if view is None:
            return list(tokenizer(text, add_special_tokens=True).input_ids)
        from opd.data.encode import _render
        from opd.data.rows import Row

        row = Row(text, None, None, None, "lion")
        ids = _render(row, tokenizer, view.chat, view.system_prompt, view.max_prompt_tokens)[1]
        return ids[-view.max_prompt_tokens :]

    def select(self, stream, ctx) -> list:
        """`stream.batch_size` instructions drawn uniformly from the pool; a round first when
        one is due (at step `round_steps` × (rounds done + 1))."""
        pool = self.pool(stream)
        if int(ctx.step) >= (self.rounds + 1) * self.round_steps:
            self.run_round(pool, ctx)
            pool = self.pool(stream)
        idx = torch.randint(len(pool), (stream.batch_size,))
        return [pool[i] for i in idx.tolist()]

    # --- a round -----------------------------------------------------------------------------------
    def find_hard(self, candidates: list[Example], ctx) -> tuple[list[dict], int]:
        """(the hard instructions as writer items, bad referee replies) (module doc)."""
        prompts = [list(ex.prompt_ids) for ex in candidates]
        answers = _greedy(ctx, ctx.student, prompts, self.max_new_tokens)
        items = [
            {"prompt": _text_of(ex), "answer": ex.answer, "student": a}
            for ex, a in zip(candidates, answers)
        ]
        use_verifier = [
            self.judge == "verifier" or (self.judge == "auto" and ex.answer is not None)
            for ex in candidates
        ]
        hard = [False] * len(items)
        for i, (it, v) in enumerate(zip(items, use_verifier)):
            if v:
                hard[i] = it["answer"] is not None and not bool(
                    ctx.verify(it["student"], it["answer"])
                )
        refer = [i for i, v in enumerate(use_verifier) if not v]
        bad = 0
        if refer:
            if ctx.teacher is None:
                raise ConfigError("lion: the referee needs a local teacher model that writes")
            refs = _greedy(ctx, ctx.teacher, [prompts[i] for i in refer], self.max_new_tokens)
            asks = [
                _encode(
                    REFEREE_TEMPLATE.format(
                        question=items[i]["prompt"], reference=r, answer=items[i]["student"]
                    ),
                    ctx.tokenizer,
                )
                for i, r in zip(refer, refs)
            ]
            for i, reply in zip(refer, _greedy(ctx, ctx.teacher, asks, 4)):
                score = parse_score(reply)
                bad += score is None
                hard[i] = score is not None and score < self.threshold
        return [it for it, h in zip(items, hard) if h], bad

    def run_round(self, pool: list[Example], ctx) -> None:
        """Discriminate the newest `judge_count` instructions, write new ones from the hard."""
        candidates = pool[-self.judge_count :]
        hard, bad = self.find_hard(candidates, ctx)
        new = (
            list(self.writer(hard, self.new_per_round, ctx)) if hard and self.new_per_round else []
        )
        self.rounds += 1
        added = 0
        for item in new[: self.new_per_round]:
            text = str(item.get("prompt") or "").strip()
            if not text:
                continue
            answer = item.get("answer")
            self.added.append(
                {
                    "prompt": text,
                    "answer": None if answer is None else str(answer),
                    "source": f"lion:round{self.rounds}:{added}",
                    "ids": self._encode(text, ctx.tokenizer),
                }
            )
            added += 1
        self.history.append(
            {
                "round": self.rounds,
                "step": int(ctx.step),
                "judged": len(candidates),
                "hard": len(hard),
                "added": added,
                "bad_replies": bad,
            }
        )

    # --- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "added": [dict(r, ids=list(r["ids"])) for r in self.added],
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        self.rounds = int(state.get("rounds", 0))
        self.added = [dict(r) for r in state.get("added", [])]
        self.history = [dict(h) for h in state.get("history", [])]
        self._added_examples = []

    def describe(self) -> str:
        return (
            f"lion pool: uniform draws from data.train plus instructions written each round of "
            f"{self.round_steps} steps from the hard ones among the newest {self.judge_count} "
            f"(judge {self.judge}, ≤ {self.new_per_round} new per round, writer "
            f"{self.writer_path})"
        )


class LionNLL(TextNLL):
    """`TextNLL` that reports the pool's growth in each step row."""

    logs: ClassVar[frozenset] = frozenset({"lion_pool_added", "lion_rounds", "lion_last_hard"})

    def __init__(self, pool: LionPool):
        self.pool = pool

    def __call__(self, student, teacher, ctx):
        ctx.log("lion_pool_added", len(self.pool.added))
        ctx.log("lion_rounds", self.pool.rounds)
        if self.pool.history:
            ctx.log("lion_last_hard", self.pool.history[-1]["hard"])
        return super().__call__(student, teacher, ctx)
