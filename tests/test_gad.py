"""`gad` (issue 11 item 5): the discriminator, its BT loss, the student's values, black-box
runs from the CLI and exact resume (discriminator weights and optimizer state included)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest
import torch

from opd.blackbox import GAD
from opd.blackbox.discriminator import Discriminator, bt_loss, last_token_index
from opd.build import Models
from opd.context import StepContext
from opd.errors import ConfigError
from opd.recipes import get_recipe
from opd.sampling import make_rollout
from opd.tiny import tiny_llama
from opd.train import distill
from opd.types import StudentRows
from tests.helpers import (
    assert_clean_error,
    fresh_models,
    run_opd,
    save_tiny_models,
    small_cli_args,
    tiny_cfg,
    write_prompts,
)
from tests.test_blackbox import patch_text_only_teacher

F64 = torch.float64


# ---------------------------------------------------------------- the BT loss by hand


def test_bt_loss_value_and_gradient_in_float64():
    s_t = torch.tensor([0.3, -1.2, 2.0], dtype=F64, requires_grad=True)
    s_s = torch.tensor([1.1, -1.5, -0.5], dtype=F64, requires_grad=True)
    loss = bt_loss(s_t, s_s)
    want = [math.log1p(math.exp(-(a - b))) for a, b in ((0.3, 1.1), (-1.2, -1.5), (2.0, -0.5))]
    assert torch.allclose(loss, torch.tensor(want, dtype=F64), rtol=0, atol=1e-15)
    assert float(loss[0].detach()) == pytest.approx(1.1711, abs=1e-4)  # −log σ(−0.8)
    loss.mean().backward()
    # ∂/∂s_t = −σ(s_s − s_t)/P, ∂/∂s_s = +σ(s_s − s_t)/P
    sig = [1 / (1 + math.exp(-(b - a))) for a, b in ((0.3, 1.1), (-1.2, -1.5), (2.0, -0.5))]
    assert torch.allclose(s_t.grad, -torch.tensor(sig, dtype=F64) / 3, rtol=0, atol=1e-15)
    assert torch.allclose(s_s.grad, torch.tensor(sig, dtype=F64) / 3, rtol=0, atol=1e-15)


def test_the_discriminator_reads_the_last_non_pad_token(tok):
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]])
    assert last_token_index(mask).tolist() == [3, 4, 2]
    disc = Discriminator(tiny_llama(len(tok), hidden=16, layers=1, seed=0))
    torch.nn.init.normal_(disc.head.weight)
    ids = torch.tensor([tok("12+3=4").input_ids])
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    pmask = torch.cat([torch.ones_like(ids), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    a = disc(ids, torch.ones_like(ids))
    b = disc(padded, pmask)
    assert torch.allclose(a, b, atol=1e-5)  # right padding does not move the score


# ---------------------------------------------------------------- separation on a synthetic case


def _pairs_rollout(tok, rng, n_prompts, group):
    """Teacher rows answer with digits, student rows with lowercase letters (G per prompt)."""
    prompts, comps = [], []
    qs = [tok(f"{rng.randint(0, 9)}+{rng.randint(0, 9)}=").input_ids for _ in range(n_prompts)]
    for q in qs:
        prompts.append(q)
        comps.append(tok("".join(rng.choice("0123456789") for _ in range(3))).input_ids)
    for q in qs:
        for _ in range(group):
            prompts.append(q)
            comps.append(tok("".join(rng.choice("abcdefghij") for _ in range(3))).input_ids)
    ro = make_rollout(prompts, comps, 0, "paired")
    return replace(ro, row_writers=("teacher",) * n_prompts + ("student",) * (n_prompts * group))


def test_the_discriminator_separates_teacher_from_student_text(tok):
    torch.manual_seed(0)
    student = tiny_llama(len(tok), hidden=48, layers=2, seed=12)
    gad = GAD(group_size=2, disc_lr=3e-3)
    gad.prepare(Models(None, student, tok, len(tok)))
    rng = random.Random(0)
    held_out = _pairs_rollout(tok, random.Random(99), 16, 2)
    before = StepContext(step=0)
    gad.discriminate(held_out, before)
    for step in range(25):
        gad.discriminate(_pairs_rollout(tok, rng, 4, 2), StepContext(step=step))
        gad.after_optimizer_step()
    after = StepContext(step=99)
    gad.discriminate(held_out, after)
    acc = after.metrics["gad_disc_accuracy"]
    print(f"discriminator accuracy on 32 held-out pairs: {before.metrics} -> {acc:.3f}")
    assert before.metrics["gad_disc_accuracy"] == 0.0  # zero head: every score ties
    assert acc > 0.9 and after.metrics["gad_disc_loss"] < 0.5
    assert gad.updates == 25


# ---------------------------------------------------------------- the student's values by hand


class FixedScores(torch.nn.Module):
    """A stand-in discriminator that returns fixed scores (a parameter, so BT can step)."""

    def __init__(self, scores):
        super().__init__()
        self.s = torch.nn.Parameter(torch.tensor(scores, dtype=F64))

    def forward(self, ids, mask):
        return self.s * 1.0


def test_gad_values_warm_up_sft_then_grpo_on_the_discriminator_scores(tok):
    # 2 prompts: teacher rows 0, 1; student rows 2, 3 (prompt 0) and 4, 5 (prompt 1)
    q = [tok("1+2=").input_ids, tok("3+4=").input_ids]
    comps = ["3", "7", "3", "12", "7x", "7"]
    ro = make_rollout(
        [q[0], q[1], q[0], q[0], q[1], q[1]], [tok(c).input_ids for c in comps], 0, "p"
    )
    ro = replace(ro, row_writers=("teacher", "teacher") + ("student",) * 4)
    mask_BT = ro.completion_mask_BT.bool()
    torch.manual_seed(0)
    hidden = torch.randn(int(mask_BT.sum()), 6, dtype=F64, requires_grad=True)
    head = torch.randn(len(tok), 6, dtype=F64)
    rows = StudentRows(hidden, head, ro.completion_ids_BT[mask_BT], mask_BT.nonzero()[:, 0])
    logq = torch.log_softmax(hidden.detach() @ head.T, -1)[
        torch.arange(len(rows.target_ids_N)), rows.target_ids_N
    ]
    row_of = rows.row_index_N.tolist()  # tokens: 3 | 7 | 3 | 1 2 | 7 x | 7
    scores = [0.5, 0.1, 0.2, 0.8, -1.0, -3.0]
    gad = GAD(group_size=2, warmup_steps=1)
    gad.disc, gad.optimizer = FixedScores(scores), None
    gad.optimizer = torch.optim.AdamW(gad.disc.parameters(), lr=0.1)
    # warm-up: −log q on the teacher's rows, × (6 non-empty rows / 2 teacher rows)
    ctx = StepContext(step=0, rollout=ro, chunk_size=4)
    values = gad(rows, None, ctx)
    want = torch.tensor(
        [-3 * float(logq[n]) if r < 2 else 0.0 for n, r in enumerate(row_of)], dtype=F64
    )
    assert torch.allclose(values.detach(), want, rtol=0, atol=1e-12)
    assert ctx.metrics["gad_warmup"] == 1.0 and ctx.metrics["reward_mean"] == pytest.approx(-0.75)
    # BT over the 4 pairs (teacher 0 vs 2, 3; teacher 1 vs 4, 5) and its accuracy
    pairs = [(0.5, 0.2), (0.5, 0.8), (0.1, -1.0), (0.1, -3.0)]
    bt = sum(math.log1p(math.exp(-(a - b))) for a, b in pairs) / 4
    assert ctx.metrics["gad_disc_loss"] == pytest.approx(bt, rel=1e-12)
    assert ctx.metrics["gad_disc_accuracy"] == 0.75
    assert gad._pairs == 4 and gad.disc.s.grad is not None
    # after warm-up: GRPO with A from the scores per group, × (6 / 4 student rows)
    ctx = StepContext(step=1, rollout=ro, chunk_size=4)
    values = gad(rows, None, ctx)
    assert gad._pairs == 4  # the gradient of step 0 was dropped: a new step began
    a1 = 0.3 / (0.6 / math.sqrt(2) + 1e-4)  # group (0.2, 0.8): A = ∓0.3/(std + ε)
    a2 = 1.0 / (2.0 / math.sqrt(2) + 1e-4)  # group (−1, −3): A = ±1/(std + ε)
    adv = {2: -a1, 3: a1, 4: a2, 5: -a2}
    want = torch.tensor([-1.5 * adv[r] if r >= 2 else 0.0 for r in row_of], dtype=F64)
    assert torch.allclose(values.detach(), want, rtol=0, atol=1e-12)
    values.sum().backward()
    assert hidden.grad[:2].abs().max() == 0 and hidden.grad[2:].abs().max() > 0


def test_gad_only_the_discriminator_trains_in_a_frozen_warm_up(tok):
    ro = make_rollout([tok("1=").input_ids] * 2, [tok("1").input_ids, tok("2").input_ids], 0, "p")
    ro = replace(ro, row_writers=("teacher", "student"))
    hidden = torch.randn(2, 6, dtype=F64, requires_grad=True)
    rows = StudentRows(
        hidden,
        torch.randn(len(tok), 6, dtype=F64),
        ro.completion_ids_BT[:, 0],
        torch.tensor([0, 1]),
    )
    gad = GAD(group_size=1, warmup_steps=3, warmup_sft=False)
    gad.disc = FixedScores([1.0, 0.0])
    gad.optimizer = torch.optim.AdamW(gad.disc.parameters(), lr=0.1)
    values = gad(rows, None, StepContext(step=2, rollout=ro, chunk_size=4))
    assert values.abs().max() == 0
    gad.after_optimizer_step()
    assert (
        gad.updates == 1
        and float(gad.disc.s[0].detach()) > 1.0
        and float(gad.disc.s[1].detach()) < 0.0
    )


def test_gad_arguments_and_rollouts_are_checked(tok):
    for bad in ({"scale": "x"}, {"disc_lr": 0}, {"group_size": 0}, {"warmup_steps": -1}):
        with pytest.raises(ConfigError, match="gad"):
            get_recipe("gad").build(**bad)
    ro = make_rollout([tok("1=").input_ids], [tok("1").input_ids], 0, "student")
    gad = GAD(group_size=2)
    gad.disc = FixedScores([0.0])
    gad.optimizer = torch.optim.AdamW(gad.disc.parameters())
    with pytest.raises(ConfigError, match="one teacher row and 2 student rows"):
        gad.discriminate(replace(ro, row_writers=("student",)), StepContext())


# ---------------------------------------------------------------- runs


def test_gad_runs_from_the_cli_with_a_teacher_that_only_writes(tmp_path, monkeypatch):
    patch_text_only_teacher(monkeypatch)
    dirs = save_tiny_models(tmp_path)
    data = write_prompts(tmp_path / "d.jsonl", n=8)
    args = small_cli_args(
        tmp_path,
        dirs,
        data,
        "recipe=gad",
        "method.args.group_size=2",
        "method.args.warmup_steps=1",
        "method.args.disc_lr=1e-3",
    )
    res = run_opd(["distill", "--no-report", *args])
    assert res.code == 0, res.err + (res.traceback or "")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["gad_warmup"] for r in steps] == [1.0, 0.0]
    assert all(0.0 <= r["gad_disc_accuracy"] <= 1.0 and "reward_mean" in r for r in steps)
    assert all(r["heldout_kl"] is None for r in rows if r.get("event") == "eval")
    assert (tmp_path / "run" / "student" / "config.json").is_file()
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert (ckpt / "components.safetensors").is_file()
    # a bad argument is one clean line
    bad = small_cli_args(tmp_path / "b", dirs, data, "recipe=gad", "method.args.scale=z")
    assert_clean_error(run_opd(["distill", *bad]), "gad", "scale")


def test_gad_resumes_exactly_with_the_discriminator_and_its_optimizer(tmp_path, tok, prompt_file):
    common = (
        "recipe=gad",
        "method.args.group_size=2",
        "method.args.warmup_steps=1",
        "method.args.disc_lr=1e-3",
        "train.steps=3",
        "train.batch_size=2",
    )
    full = distill(
        tiny_cfg(tmp_path, prompt_file, *common, name="full"),
        models=fresh_models(tok),
        evaluate=False,
        log=lambda *a: None,
    )
    cut_cfg = tiny_cfg(tmp_path, prompt_file, *common, name="cut")
    distill(cut_cfg, models=fresh_models(tok), stop_after=2, evaluate=False, log=lambda *a: None)
    cut = distill(
        tiny_cfg(tmp_path, prompt_file, *common, name="cut"),
        models=fresh_models(tok),
        resume=True,
        evaluate=False,
        log=lambda *a: None,
    )
    assert cut.losses == full.losses and len(full.losses) == 3
    keys = ("gad_disc_loss", "gad_disc_accuracy", "reward_mean")
    assert [cut.metrics[-1][k] for k in keys] == [full.metrics[-1][k] for k in keys]
    d_full, d_cut = full.method.signal, cut.method.signal
    assert d_full.updates == d_cut.updates == 3
    for (n, a), b in zip(d_full.disc.state_dict().items(), d_cut.disc.state_dict().values()):
        assert torch.equal(a, b), n
    s_full = d_full.optimizer.state_dict()["state"]
    s_cut = d_cut.optimizer.state_dict()["state"]
    assert s_full.keys() == s_cut.keys()
    for k in s_full:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s_full[k][name], s_cut[k][name]), (k, name)
    for a, b in zip(full.models.student.parameters(), cut.models.student.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_gad_on_the_embedded_pair_resumes_exactly(tmp_path):
    """Two `gad` steps on the embedded SmolLM2 teacher and a 4-layer pruned student from the
    CLI (a checkpoint per step); a copy of the run cut back to its step-1 checkpoint and
    resumed logs the uninterrupted run's step 2 and ends with the same student."""
    import shutil

    from safetensors.torch import load_file

    data = write_prompts(tmp_path / "d.jsonl", n=4)
    full = tmp_path / "full"
    res = run_opd(
        [
            "distill",
            "recipe=gad",
            "method.args.group_size=2",
            "method.args.warmup_steps=1",
            "model.student=embedded",
            "model.student_prune_to=4",  # a quicker 4-layer copy: the test is about resume
            f"data.train={data}",
            "data.eval_count=0",
            "data.chat_template=false",
            "train.steps=2",
            "train.batch_size=1",
            "train.checkpoint_every=1",
            "sampling.max_new_tokens=4",
            "train.progress=false",
            "--no-report",
            f"output_dir={full}",
        ]
    )
    assert res.code == 0, res.err
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_000002")
    shutil.rmtree(cut / "student")
    (cut / "checkpoints" / "latest").write_text("step_000001\n")
    assert (cut / "checkpoints" / "step_000001" / "components.safetensors").is_file()
    res = run_opd(["distill", "--resume", str(cut), "--no-report"])
    assert res.code == 0, res.err
    assert "resumed from" in res.out and "step 1" in res.out

    def rows(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if '"loss"' in x]

    keys = ("loss", "gad_disc_loss", "reward_mean", "gad_teacher_score", "gad_warmup")
    assert [[r[k] for k in keys] for r in rows(cut)] == [[r[k] for k in keys] for r in rows(full)]
    assert [r["gad_warmup"] for r in rows(full)] == [1.0, 0.0]
    for name in ("student.safetensors", "components.safetensors"):
        a = load_file(str(full / "checkpoints" / "step_000002" / name))
        b = load_file(str(cut / "checkpoints" / "step_000002" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_the_discriminator_step_is_the_mean_over_the_steps_micro_batches(tok):
    ro = make_rollout([tok("1=").input_ids] * 2, [tok("1").input_ids, tok("2").input_ids], 0, "p")
    ro = replace(ro, row_writers=("teacher", "student"))
    gad = GAD(group_size=1, disc_max_grad_norm=0.0)
    gad.disc = FixedScores([0.5, 1.5])
    gad.optimizer = torch.optim.SGD(gad.disc.parameters(), lr=1.0)
    ctx = StepContext(step=3)
    gad.discriminate(ro, ctx)
    gad.discriminate(ro, ctx)  # a second micro-batch of the same optimizer step
    assert gad._pairs == 2
    gad.after_optimizer_step()
    # mean gradient of −log σ(s_t − s_s) over the 2 identical pairs: ∓σ(s_s − s_t) = ∓σ(1)
    sig = 1 / (1 + math.exp(-1.0))
    want = torch.tensor([0.5 + sig, 1.5 - sig], dtype=F64)
    assert torch.allclose(gad.disc.s.detach(), want, rtol=0, atol=1e-15)
    assert gad._pairs == 0 and gad.updates == 1 and gad.disc.s.grad is None
