"""`lion` (issue 11 item 5): hard-instruction selection and pool growth, exactly, on a tiny case;
the referee's scores; runs from the CLI with a teacher that only writes; exact resume."""

from __future__ import annotations

import json

import pytest

from opd.blackbox.lion import WRITER_TEMPLATE, LionPool, teacher_writes
from opd.build import Models
from opd.context import StepContext
from opd.data.encode import Example
from opd.errors import ConfigError
from opd.evaluate import generic_verify
from opd.recipes import get_recipe
from opd.train import distill
from tests.helpers import (
    assert_clean_error,
    fresh_models,
    run_opd,
    save_tiny_models,
    small_cli_args,
    tiny_cfg,
    write_prompts,
)
from tests.test_blackbox import TextOnlyTeacher, patch_text_only_teacher


def harder_sums(hard, n, ctx):
    """A test writer in the role of a task generator: from the hard sum "a+b=", the i-th
    new instruction adds a term: "a+b+k=" with k = i // len(hard) + 1, answer included."""
    out = []
    for i in range(n):
        src = hard[i % len(hard)]["prompt"].rstrip("=")
        k = i // len(hard) + 1
        out.append({"prompt": f"{src}+{k}=", "answer": str(eval(src) + k)})  # noqa: S307
    return out


class Canned:
    """A generation backend answering call c with `calls[c]` (one text per prompt)."""

    def __init__(self, tok, calls):
        self.tok, self.calls, self.seen = tok, list(calls), []

    def generate(self, model, prompts, params, *, pad_id, stop_ids):
        assert params.temperature == 0.0  # judging is greedy
        texts = self.calls.pop(0)
        assert len(texts) == len(prompts)
        self.seen.append([self.tok.decode(p) for p in prompts])
        return [self.tok(t).input_ids for t in texts]


class Stream:
    def __init__(self, examples, batch_size=2):
        self.examples, self.batch_size = examples, batch_size


def _examples(tok, rows):
    return [
        Example(tuple(tok(p).input_ids), None, a, f"r{i}", p, p) for i, (p, a) in enumerate(rows)
    ]


WRITER = "tests.test_lion:harder_sums"


def test_hard_selection_and_pool_growth_are_exact(tok):
    stream = Stream(_examples(tok, [("1+2=", "3"), ("3+4=", "7"), ("5+1=", "6"), ("2+2=", "4")]))
    backend = Canned(tok, [["8", "6", "5"], ["8", "0", "9"]])
    ctx = StepContext(student=object(), backend=backend, tokenizer=tok, verify=generic_verify)
    pool = LionPool(round_steps=2, judge_count=3, new_per_round=3, writer=WRITER)
    for step in range(4):
        ctx.step = step
        batch = pool.select(stream, ctx)
        assert len(batch) == 2
    # round 1 at step 2: the newest 3 judged; 3+4= (said 8) and 2+2= (said 5) are hard
    assert backend.seen[0] == ["3+4=", "5+1=", "2+2="]
    assert [r["prompt"] for r in pool.added] == ["3+4+1=", "2+2+1=", "3+4+2="]
    assert [r["answer"] for r in pool.added] == ["8", "5", "9"]
    assert pool.added[0]["ids"] == list(tok("3+4+1=").input_ids)
    assert pool.history == [
        {"round": 1, "step": 2, "judged": 3, "hard": 2, "added": 3, "bad_replies": 0}
    ]
    ctx.step = 4  # round 2: the 3 new ones judged; only 2+2+1= (said 0) is hard
    pool.select(stream, ctx)
    assert backend.seen[1] == ["3+4+1=", "2+2+1=", "3+4+2="]
    assert [r["prompt"] for r in pool.added[3:]] == ["2+2+1+1=", "2+2+1+2=", "2+2+1+3="]
    assert pool.rounds == 2 and len(pool.pool(stream)) == 10
    assert pool.history[-1]["hard"] == 1 and pool.history[-1]["added"] == 3
    # the state is JSON and restores the same pool
    state = json.loads(json.dumps(pool.state_dict()))
    again = LionPool(round_steps=2, judge_count=3, new_per_round=3, writer=WRITER)
    again.load_state_dict(state)
    assert again.pool(stream) == pool.pool(stream) and again.rounds == 2
    ctx.step = 5  # no round due: nothing is judged
    again.select(stream, ctx)
    assert again.rounds == 2 and len(backend.calls) == 0


def test_the_referee_marks_low_scores_hard_and_counts_bad_replies(tok):
    stream = Stream(_examples(tok, [("say hi", None), ("count", None), ("name a color", None)]))
    calls = [["yo", "1 2", "red"], ["hi", "1 2 3", "blue"], ["9", "3", "x"]]
    backend = Canned(tok, calls)
    ctx = StepContext(
        student=object(), teacher=object(), backend=backend, tokenizer=tok, verify=generic_verify
    )
    pool = LionPool(judge="auto", threshold=7, writer=WRITER)
    hard, bad = pool.find_hard(pool.pool(stream), ctx)
    assert [h["prompt"] for h in hard] == ["count"] and hard[0]["student"] == "1 2"
    assert bad == 1  # "x" has no digit: not hard, counted
    assert "Reference answer: 1 2 3" in backend.seen[2][1]
    assert "Assistant's answer: 1 2" in backend.seen[2][1]


def test_the_default_writer_asks_the_teacher_with_the_template(tok):
    class Gen:
        def generate(self, model, prompts, params, *, pad_id, stop_ids):
            self.prompts = [tok.decode(p) for p in prompts]
            return [tok(" 4+4+4= ").input_ids, []]

    gen = Gen()
    ctx = StepContext(teacher=object(), backend=gen, tokenizer=tok)
    out = teacher_writes([{"prompt": "1+1="}], 2, ctx)
    assert out == [{"prompt": "4+4+4="}]  # stripped; the empty reply dropped
    assert WRITER_TEMPLATE.format(instruction="1+1=") in gen.prompts[0]  # chat-wrapped


def test_lion_arguments_are_checked():
    with pytest.raises(ConfigError, match="judge 'x'"):
        get_recipe("lion").build(judge="x")
    with pytest.raises(ConfigError, match="cannot import"):
        get_recipe("lion").build(writer="no_such_module:f")
    with pytest.raises(ConfigError, match="round_steps"):
        get_recipe("lion").build(round_steps=0)


def test_lion_runs_from_the_cli_with_a_teacher_that_only_writes(tmp_path, monkeypatch):
    patch_text_only_teacher(monkeypatch)
    dirs = save_tiny_models(tmp_path)
    data = write_prompts(tmp_path / "d.jsonl", n=8)
    lion_args = [
        "recipe=lion",
        "method.args.round_steps=2",
        "method.args.judge_count=4",
        "method.args.new_per_round=2",
        f"method.args.writer={WRITER}",
        "method.args.max_new_tokens=4",
    ]
    args = small_cli_args(tmp_path, dirs, data, *lion_args, "train.steps=3")
    res = run_opd(["distill", "--no-report", *args])
    assert res.code == 0, res.err + (res.traceback or "")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["lion_rounds"] for r in steps] == [0.0, 0.0, 1.0]
    state = json.loads(
        (tmp_path / "run" / "checkpoints" / "step_000003" / "state.json").read_text()
    )
    pool = state["components"]["prompts"]
    assert pool["rounds"] == 1 and pool["history"][0]["judged"] == 4
    # the random tiny student fails every sum: 2 new instructions from the first hard ones
    assert pool["history"][0]["hard"] == 4 and len(pool["added"]) == 2
    assert [r["lion_pool_added"] for r in steps] == [0.0, 0.0, 2.0]
    assert all(r["heldout_kl"] is None for r in rows if r.get("event") == "eval")
    bad = small_cli_args(tmp_path / "b", dirs, data, "recipe=lion", "method.args.writer=nope")
    assert_clean_error(run_opd(["distill", *bad]), "writer", "nope")


def test_lion_resumes_exactly_with_its_pool(tmp_path, tok, prompt_file):
    common = (
        "recipe=lion",
        "method.args.round_steps=2",
        "method.args.judge_count=3",
        "method.args.new_per_round=2",
        f"method.args.writer={WRITER}",
        "method.args.max_new_tokens=4",
        "train.steps=5",
        "train.batch_size=2",
    )
    quiet = {"evaluate": False, "log": lambda *a: None}

    def models():
        m = fresh_models(tok)
        return Models(TextOnlyTeacher(m.teacher), m.student, tok, m.vocab_size)

    full = distill(tiny_cfg(tmp_path, prompt_file, *common, name="full"), models=models(), **quiet)
    cut = tiny_cfg(tmp_path, prompt_file, *common, name="cut")
    distill(cut, models=models(), stop_after=3, **quiet)
    cut = tiny_cfg(tmp_path, prompt_file, *common, name="cut")
    resumed = distill(cut, models=models(), resume=True, **quiet)
    assert resumed.losses == full.losses and len(full.losses) == 5
    a, b = full.method.prompts, resumed.method.prompts
    assert a.rounds == b.rounds == 2 and a.added == b.added and a.history == b.history
