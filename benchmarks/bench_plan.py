"""`opd plan`'s predictions against component times measured inside real training steps.

    PYTHONPATH=. python benchmarks/bench_plan.py [--steps 6] [--demo-steps 3] [--repeats 3]
        [--threads 1] [--memory] [--out DIR]

Settings: the speed benchmark's (`opd bench speed`: gkd λ = 1, β = 1, tiny Llamas 4 × 256
teacher / 2 × 128 student, batch 16, 32 new tokens, sort prompts) with its two output
vocabularies (105 and 49,152), and the demo's (`opd demo`: SmolLM2-135M-Instruct 30 layers
→ 15 pruned layers, on_policy_rkl, batch 8, 32 new tokens; the GGUF cache must be filled;
held-out evaluations only with --demo-eval). All with `--threads` torch threads (default 1:
on a shared 2-core machine one thread is the steadier measurement).

Measured per step, by wrapping the functions a step calls (`opd.step`), first step dropped,
median over the rest:

    generation   the rollout (`opd.step._rollout`: the student's sampling)
    teacher      `method.teacher.score` (the teacher's decoder forward)
    loss         `opd.step.one_pass_loss` (both heads, the divergence and its gradient)
    student      the step's seconds − the three above (the student's forward, backward,
                 clipping and AdamW)

Robust to a shared machine: with one thread (the default) everything, calibration and
steps, is timed in the thread's CPU seconds (`time.thread_time`: what the work takes on an
idle machine; other processes do not inflate it, though they still share the caches and
memory bandwidth); `--wall` times wall seconds. Each round calibrates
(`opd.plan_device.calibrate`) and then measures, back-to-back in the same process, and the
rounds repeat (`--repeats`); each round's prediction uses its own calibration and the
sequence lengths measured in its steps (a planner input), and the one-minute load average
is recorded before and after each calibration and measurement. The summary is the median over rounds of predicted and of
measured seconds; every round is printed.

`--memory`: peak memory, measured in a fresh subprocess per setting (load the models, then
reset the kernel's peak-RSS counter, `opd.bench.memory`, and run 2 steps: peak RSS growth
after loading) against `opd.plan.peak_memory_bytes` minus the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import opd.step
import opd.train
from opd.bench.memory import peak_kb, reset_peak
from opd.build import finish_models
from opd.config import load_config
from opd.plan import Shape, Workload, peak_memory_bytes, predict_step
from opd.plan_device import calibrate
from opd.run_setup import build_method

PARTS = ("generation", "teacher", "student", "loss")


class Timers:
    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.steps, self.cur, self.lengths, self.peaks_kb = [], {}, [], []

    def wrap(self, name, fn):
        def timed(*a, **kw):
            t0 = self.clock()
            out = fn(*a, **kw)
            self.cur[name] = self.cur.get(name, 0.0) + self.clock() - t0
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
        t0 = timers.clock()
        row = saved["train_step"](run, i)
        total = timers.clock() - t0
        timers.steps.append({**timers.cur, "total": total, "wall": row["seconds"]})
        timers.peaks_kb.append(peak_kb())  # the high-water mark after this step
        return row

    opd.train.train_step = step
    try:
        yield
    finally:
        opd.step._rollout = saved["_rollout"]
        opd.step.one_pass_loss = saved["one_pass_loss"]
        opd.train.train_step = saved["train_step"]
        access.score = score


def measure(cfg, models, evaluate=False, clock=time.perf_counter) -> tuple[dict, tuple, list]:
    timers = Timers(clock)
    method = build_method(cfg)
    with instrumented(timers, method):
        res = opd.train.distill(cfg, models=models, method=method, evaluate=evaluate,
                                log=lambda *_: None)  # fmt: skip
    rows = timers.steps[1:]
    med = {
        k: statistics.median(r.get(k, 0.0) for r in rows)
        for k in ("generation", "teacher", "loss", "total", "wall")
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


def speed_setting(vocab: int, steps: int, tmp: Path, threads: int):
    from opd.bench.step_workers import _opd_recipe, prompts, tiny_pair

    teacher, student, tok = tiny_pair(vocab)
    models = finish_models(teacher, student, tok)
    data = tmp / "sort.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts()))
    cfg = load_config(None, [
        f"output_dir={tmp}/speed-{vocab}", f"data.train={data}", f"data.eval={data}",
        "data.eval_count=1", "data.chat_template=false", *_opd_recipe(1.0),
        f"train.steps={steps}", "train.batch_size=16", "train.lr=1e-4", "train.progress=false",
        "sampling.max_new_tokens=32", f"train.threads={threads}",
    ])  # fmt: skip
    return cfg, models


def demo_setting(steps: int, tmp: Path, threads: int):
    from opd.build import build_models
    from opd.cli import DEMO_DEFAULTS

    cfg = load_config(None, [*DEMO_DEFAULTS, f"train.steps={steps}", f"output_dir={tmp}/demo",
                             "train.progress=false", f"train.threads={threads}"])  # fmt: skip
    return cfg, build_models(cfg)


SETTINGS = {"speed bench, vocab 105": 0, "speed bench, vocab 49152": 49152, "demo": None}


def make_setting(name: str, steps: int, demo_steps: int, tmp: Path, threads: int):
    vocab = SETTINGS[name]
    if vocab is None:
        return demo_setting(demo_steps, tmp, threads)
    return speed_setting(vocab, steps, tmp, threads)


def workload(cfg, P: float, C: float, steps: float) -> Workload:
    return Workload(batch=cfg.train.batch_size, prompt_tokens=P, completion_tokens=C,
                    chunk_size=cfg.train.chunk_size, decode_steps=steps)  # fmt: skip


def load() -> float:
    return os.getloadavg()[0]


def one_round(cfg, models, threads: int, evaluate: bool, clock) -> dict:
    """Calibrate, then measure, back-to-back; the prediction from this round's numbers."""
    torch.set_num_threads(threads)
    loads = [load()]
    t0 = time.perf_counter()
    dev = calibrate(threads, clock)
    cal_s = time.perf_counter() - t0
    loads.append(load())
    measured, (P, C, steps), evals = measure(cfg, models, evaluate, clock)
    loads.append(load())
    predicted = predict_step(shape(models.student), shape(models.teacher),
                             workload(cfg, P, C, steps), dev)  # fmt: skip
    return {"P": P, "C": C, "decode_steps": steps, "measured": measured, "predicted": predicted,
            "device": dev.__dict__, "load": loads, "calibration_s": cal_s,
            "diag_seconds": [(r["step"], r.get("diag_seconds")) for r in evals]}  # fmt: skip


def memory_child(name: str, steps: int, threads: int) -> dict:
    """In a fresh process: peak RSS growth over `steps` steps after loading (opd.bench.memory)."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, models = make_setting(name, steps, steps, Path(tmp), threads)
        base = reset_peak()
        timers = Timers()
        method = build_method(cfg)
        with instrumented(timers, method):
            opd.train.distill(cfg, models=models, method=method, evaluate=False,
                              log=lambda *_: None)  # fmt: skip
        growth = (max(timers.peaks_kb) - base) * 1024  # the steps only, not the final save
    P, C, dsteps = (statistics.mean(x[i] for x in timers.lengths) for i in range(3))
    s, t = shape(models.student), shape(models.teacher)
    pred = peak_memory_bytes(s, t, workload(cfg, P, C, dsteps))
    return {"setting": name, "measured_growth": growth, "predicted": pred, "P": P, "C": C}


def memory(name: str, threads: int) -> dict:
    argv = [sys.executable, __file__, "--memory-child", name, "--threads", str(threads)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def ratio(p: float, m: float) -> str:
    r = p / m if m > 0 else float("nan")
    return f"{r:.2f}" + ("" if 0.7 <= r <= 1.3 else " **outside ±30 %**")


def markdown(results: dict, mem: list) -> str:
    lines = ["| setting | component | predicted s | measured s | predicted / measured | "
             "rounds (pred / meas) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, rounds in results.items():
        for part in (*PARTS, "total"):
            ps = [r["predicted"][part] for r in rounds]
            ms = [r["measured"][part] for r in rounds]
            p, m = statistics.median(ps), statistics.median(ms)
            each = ", ".join(f"{a:.3g} / {b:.3g}" for a, b in zip(ps, ms))
            lines.append(f"| {name} | {part} | {p:.4f} | {m:.4f} | {ratio(p, m)} | {each} |")
    lines.append("")
    for name, rounds in results.items():
        for i, r in enumerate(rounds, 1):
            lo = " → ".join(f"{x:.2f}" for x in r["load"])
            lines.append(f"- {name}, round {i}: load {lo} (before calibration → before "
                         f"measurement → after); calibration {r['calibration_s']:.0f} s wall; "
                         f"step {r['measured']['total']:.3g} s timed, "
                         f"{r['measured']['wall']:.3g} s wall; "
                         f"P {r['P']:.1f}, C {r['C']:.1f}, {r['decode_steps']:.1f} decode "
                         f"steps; diagnostics (step, s): {r['diag_seconds']}")  # fmt: skip
    if mem:
        lines += ["", "| setting | predicted growth after loading, MiB | measured, MiB | "
                  "predicted / measured | predicted peak incl. weights, MiB |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in mem:
            p, m = r["predicted"]["after loading"], r["measured_growth"]
            lines.append(f"| {r['setting']} | {p / 2**20:.0f} | {m / 2**20:.0f} | "
                         f"{ratio(p, m)} | {r['predicted']['total'] / 2**20:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--demo-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="calibrate + measure rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--wall",
        action="store_true",
        help="time in wall seconds (default with "
        "one thread: the thread's CPU seconds, which other processes do not inflate)",
    )
    p.add_argument("--only", action="append", choices=list(SETTINGS), help="these settings")
    p.add_argument("--demo-eval", action="store_true", help="the demo's held-out evaluations")
    p.add_argument("--memory", action="store_true", help="also measure peak memory")
    p.add_argument("--memory-only", action="store_true", help="only measure peak memory")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="write plan.json, plan.md and the runs here")
    a = p.parse_args(argv)
    if a.memory_child:
        print(json.dumps(memory_child(a.memory_child, 2, a.threads)))
        return 0
    names = a.only or list(SETTINGS)
    clock = time.perf_counter if a.wall or a.threads != 1 else time.thread_time
    results, mem = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(a.out) if a.out else Path(tmp)  # --out keeps the run folders
        tmp.mkdir(parents=True, exist_ok=True)
        for name in names if not a.memory_only else ():
            cfg, models = make_setting(name, a.steps, a.demo_steps, tmp, a.threads)
            evaluate = a.demo_eval and SETTINGS[name] is None
            results[name] = []
            for i in range(a.repeats):
                cfg.output_dir = str(tmp / f"{name.replace(' ', '_').replace(',', '')}-{i}")
                results[name].append(one_round(cfg, models, a.threads, evaluate, clock))
                print(json.dumps({"setting": name, **results[name][-1]}), flush=True)
        if a.memory or a.memory_only:
            for name in names:
                mem.append(memory(name, a.threads))
                print(json.dumps(mem[-1]), flush=True)
    md = markdown(results, mem)
    print(md)
    if a.out:
        Path(a.out, "plan.json").write_text(json.dumps({"results": results, "memory": mem},
                                                       indent=1))  # fmt: skip
        Path(a.out, "plan.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
