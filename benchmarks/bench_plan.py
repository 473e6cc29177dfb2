"""`opd plan`'s predictions against component times measured inside real training steps.

    PYTHONPATH=. python benchmarks/bench_plan.py [--steps 6] [--demo-steps 30] [--out DIR]

Settings: the speed benchmark's (`opd bench speed`: gkd λ = 1, β = 1, tiny Llamas 4 × 256
teacher / 2 × 128 student, batch 16, 32 new tokens, sort prompts, one torch thread) with
its two output vocabularies (105 and 49,152), and the demo's (`opd demo`: SmolLM2-135M-Instruct
30 layers → 15 pruned layers, on_policy_rkl, batch 8, 32 new tokens, torch's default
threads; the GGUF cache must be filled).

Measured per step, by wrapping the functions a step calls (`opd.step`), first step dropped,
median over the rest:

    generation   the rollout (`opd.step._rollout`: the student's sampling)
    teacher      `method.teacher.score` (the teacher's decoder forward)
    loss         `opd.step.one_pass_loss` (both heads, the divergence and its gradient)
    student      the step's seconds − the three above (the student's forward, backward,
                 clipping and AdamW)

The predictions use the device numbers of `opd plan --calibrate` taken just before, with the
same thread count, and the sequence lengths measured in the same steps (a planner input).
The demo setting also runs its held-out evaluations (steps 0 and last), whose rows give the
extra seconds of `opd.diagnostics` per evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import opd.step
import opd.train
from opd.build import finish_models
from opd.config import load_config
from opd.plan import Shape, Workload, predict_step
from opd.plan_device import calibrate
from opd.run_setup import build_method

PARTS = ("generation", "teacher", "student", "loss")


class Timers:
    def __init__(self):
        self.steps, self.cur, self.lengths = [], {}, []

    def wrap(self, name, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.cur[name] = self.cur.get(name, 0.0) + time.perf_counter() - t0
            if name == "generation":
                ro = out
                p = ro.attention_mask_BL[:, : ro.prompt_len].sum(1).float().mean()
                c_B = ro.completion_mask_BT.sum(1).float()
                self.lengths.append((float(p), float(c_B.mean()), float(c_B.max())))
            return out

        return timed


@contextlib.contextmanager
def instrumented(timers: Timers, method):
    saved = {
        "_rollout": opd.step._rollout,
        "one_pass_loss": opd.step.one_pass_loss,
        "train_step": opd.train.train_step,
    }
    access = type(method.teacher)
    score = access.score
    opd.step._rollout = timers.wrap("generation", saved["_rollout"])
    opd.step.one_pass_loss = timers.wrap("loss", saved["one_pass_loss"])
    access.score = timers.wrap("teacher", score)

    def step(run, i):
        timers.cur = {}
        row = saved["train_step"](run, i)
        timers.steps.append({**timers.cur, "total": row["seconds"]})
        return row

    opd.train.train_step = step
    try:
        yield
    finally:
        opd.step._rollout = saved["_rollout"]
        opd.step.one_pass_loss = saved["one_pass_loss"]
        opd.train.train_step = saved["train_step"]
        access.score = score


def measure(cfg, models, evaluate=False) -> tuple[dict, tuple, list]:
    timers = Timers()
    method = build_method(cfg)
    with instrumented(timers, method):
        res = opd.train.distill(cfg, models=models, method=method, evaluate=evaluate,
                                log=lambda *_: None)  # fmt: skip
    rows = timers.steps[1:]
    med = {
        k: statistics.median(r.get(k, 0.0) for r in rows)
        for k in ("generation", "teacher", "loss", "total")
    }
    med["student"] = statistics.median(
        r["total"] - r.get("generation", 0) - r.get("teacher", 0) - r.get("loss", 0) for r in rows
    )
    lengths = timers.lengths[1:]
    P = statistics.mean(x[0] for x in lengths)
    C = statistics.mean(x[1] for x in lengths)
    steps = statistics.mean(x[2] for x in lengths)
    evals = [r for r in map(json.loads, (res.run_dir / "metrics.jsonl").read_text().splitlines())
             if r.get("event") == "eval"]  # fmt: skip
    return med, (P, C, steps), evals


def shape(model) -> Shape:
    c = model.config
    return Shape(hidden=c.hidden_size, layers=c.num_hidden_layers,
                 intermediate=c.intermediate_size, vocab=model.get_output_embeddings().weight.shape[0],
                 heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                 tied=bool(c.tie_word_embeddings))  # fmt: skip


def speed_setting(vocab: int, steps: int, tmp: Path):
    from opd.bench.step_workers import _opd_recipe, prompts, tiny_pair

    teacher, student, tok = tiny_pair(vocab)
    models = finish_models(teacher, student, tok)
    data = tmp / "sort.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts()))
    cfg = load_config(None, [
        f"output_dir={tmp}/speed-{vocab}", f"data.train={data}", f"data.eval={data}",
        "data.eval_count=1", "data.chat_template=false", *_opd_recipe(1.0),
        f"train.steps={steps}", "train.batch_size=16", "train.lr=1e-4", "train.progress=false",
        "sampling.max_new_tokens=32", "train.threads=1",
    ])  # fmt: skip
    return cfg, models, 1


def demo_setting(steps: int, tmp: Path):
    from opd.build import build_models
    from opd.cli import DEMO_DEFAULTS

    cfg = load_config(None, [*DEMO_DEFAULTS, f"train.steps={steps}", f"output_dir={tmp}/demo",
                             "train.progress=false"])  # fmt: skip
    return cfg, build_models(cfg), torch.get_num_threads()


def compare(name, cfg, models, threads, evaluate, devices) -> dict:
    torch.set_num_threads(threads)
    if threads not in devices:
        devices[threads] = calibrate(threads)
    measured, (P, C, steps), evals = measure(cfg, models, evaluate)
    w = Workload(batch=cfg.train.batch_size, prompt_tokens=P, completion_tokens=C,
                 chunk_size=cfg.train.chunk_size, decode_steps=steps)  # fmt: skip
    predicted = predict_step(shape(models.student), shape(models.teacher), w, devices[threads])
    diag = [(r["step"], r.get("diag_seconds")) for r in evals]
    out = {"setting": name, "threads": threads, "P": P, "C": C, "decode_steps": steps,
           "measured": measured,
           "predicted": predicted, "diag_seconds": diag}  # fmt: skip
    print(json.dumps(out), flush=True)
    return out


def markdown(results: list[dict], devices: dict) -> str:
    lines = ["| setting | component | predicted s | measured s | predicted / measured |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        for part in (*PARTS, "total"):
            p, m = r["predicted"][part], r["measured"][part]
            ratio = p / m if m > 0 else float("nan")
            flag = "" if 0.7 <= ratio <= 1.3 else " **outside ±30 %**"
            lines.append(f"| {r['setting']} | {part} | {p:.4f} | {m:.4f} | {ratio:.2f}{flag} |")
    lines.append("")
    for t, d in sorted(devices.items()):
        lines.append(f"- device, {t} thread(s): " + ", ".join(
            f"{k} {v:.3g}" for k, v in d.__dict__.items() if isinstance(v, float)))  # fmt: skip
    for r in results:
        lines.append(f"- {r['setting']}: mean prompt {r['P']:.1f} tokens, completion {r['C']:.1f} "
                     f"({r['decode_steps']:.1f} decode steps); "
                     f"diagnostics seconds per evaluation (step, s): {r['diag_seconds']}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--demo-steps", type=int, default=30, help="the demo's own 30 by default")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--out", default=None, help="write plan.json, plan.md and the runs here")
    a = p.parse_args(argv)
    default_threads = torch.get_num_threads()
    devices, results = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(a.out) if a.out else Path(tmp)  # --out keeps the run folders
        tmp.mkdir(parents=True, exist_ok=True)
        for vocab in (0, 49152):
            cfg, models, threads = speed_setting(vocab, a.steps, tmp)
            name = f"speed bench, vocab {vocab or 105}"
            results.append(compare(name, cfg, models, threads, False, devices))
        if not a.skip_demo:
            torch.set_num_threads(default_threads)
            cfg, models, threads = demo_setting(a.demo_steps, tmp)
            results.append(compare("demo", cfg, models, threads, True, devices))
    md = markdown(results, devices)
    print(md)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "plan.json").write_text(
            json.dumps(
                {"results": results, "devices": {t: d.__dict__ for t, d in devices.items()}},
                indent=1,
            )
        )
        Path(a.out, "plan.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
