"""The scale knobs on the speed benchmark's settings: seconds per step and peak memory.

One opd training run per variant, each in a fresh process, variants run in turn and the
whole cycle repeated (`--repeats`), on the speed benchmark's opd side (`opd.bench.step_workers`:
student 2 × 128 and teacher 4 × 256 tiny Llamas, `sort` prompts, gkd λ = 1 β = 1, batch 16,
≤ 32 new tokens, temperature 1, lr 1e-4, 12 steps of which the first 2 are dropped):

    fp32        the reference: float32 weights and compute
    bf16        train.precision=bf16 (bfloat16 autocast over float32 master weights)
    lora        model.lora_r=8 (PEFT adapters on every linear layer; base frozen)
    gc          train.gradient_checkpointing=true
    async1/2    train.async_rollouts=1 / 2 (rollouts and teacher scores in a background thread)

Reported: the median over processes of each process's median step seconds, the ratio to
fp32 from the same cycle, and the process's peak resident memory (ru_maxrss, which includes
the Python interpreter and libraries, ~0.4 GB here; equal for all variants).

    python benchmarks/bench_scale.py [--repeats 2] [--threads 1] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "fp32": [],
    "bf16": ["train.precision=bf16"],
    "lora": ["model.lora_r=8"],
    "gc": ["train.gradient_checkpointing=true"],
    "async1": ["train.async_rollouts=1"],
    "async2": ["train.async_rollouts=2"],
}


def worker(variant: str, threads: int, steps: int, skip: int) -> dict:
    import torch

    from opd.bench.step_workers import _opd_recipe, prompts, tiny_pair
    from opd.build import finish_models
    from opd.config import load_config
    from opd.train import distill

    torch.set_num_threads(threads)
    teacher, student, tok = tiny_pair(0)
    models = None if variant == "lora" else finish_models(teacher, student, tok)
    with tempfile.TemporaryDirectory() as tmp:
        extra = []
        if models is None:  # LoRA wraps the student at load time: give it as folders
            for name, m in (("teacher", teacher), ("student", student)):
                m.save_pretrained(f"{tmp}/{name}")
                tok.save_pretrained(f"{tmp}/{name}")
            extra = [f"model.teacher={tmp}/teacher", f"model.student={tmp}/student"]
        data = Path(tmp, "prompts.jsonl")
        data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts()))
        cfg = load_config(None, [
            f"output_dir={tmp}/run", f"data.train={data}", f"data.eval={data}",
            "data.eval_count=1", "data.chat_template=false", *_opd_recipe(1.0),
            f"train.steps={steps}", "train.batch_size=16", "train.lr=1e-4",
            "train.progress=false", "sampling.max_new_tokens=32", "sampling.temperature=1.0",
            f"train.threads={threads}", *extra, *VARIANTS[variant],
        ])  # fmt: skip
        res = distill(cfg, models=models, evaluate=False, log=lambda *_: None)
    sec = [r["seconds"] for r in res.metrics][skip:]
    return {
        "variant": variant,
        "threads": threads,
        "seconds_per_step": statistics.median(sec),
        "tokens_per_step": statistics.mean(r["tokens"] for r in res.metrics),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.threads, a.steps, a.skip)))
        return
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    runs = []
    for cycle in range(a.repeats):
        for variant in a.variants:
            cmd = [sys.executable, __file__, "--worker", variant, "--threads", str(a.threads)]
            cmd += ["--steps", str(a.steps), "--skip", str(a.skip)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            runs.append({**json.loads(out.stdout.strip().splitlines()[-1]), "cycle": cycle})
            print(json.dumps(runs[-1]), flush=True)
    base = {r["cycle"]: r["seconds_per_step"] for r in runs if r["variant"] == "fp32"}
    print(f"\n{a.threads} thread(s), {a.repeats} cycle(s)\n")
    print("| variant | s / step | vs fp32 (per cycle) | peak RSS MB |")
    print("|---|---:|---:|---:|")
    for variant in a.variants:
        mine = [r for r in runs if r["variant"] == variant]
        sec = statistics.median(r["seconds_per_step"] for r in mine)
        ratios = ", ".join(f"{base[r['cycle']] / r['seconds_per_step']:.2f}×" for r in mine
                           if r["cycle"] in base)  # fmt: skip
        rss = statistics.median(r["peak_rss_mb"] for r in mine)
        print(f"| {variant} | {sec:.3f} | {ratios} | {rss:.0f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
