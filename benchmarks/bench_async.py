"""Steps / s of the asynchronous rollout pipeline (train.async_rollouts=k) vs synchronous.

The speed benchmark's opd side (`opd.bench.step_workers`: student 2 × 128 and teacher
4 × 256 tiny Llamas, `sort` prompts, gkd with λ = 1 and β = 1, batch 16, ≤ 32 new tokens,
temperature 1, lr 1e-4, float32, 12 steps of which the first 2 are dropped), once per k, in
fresh processes run in turn (k = 0, 1, 2, 0, 1, 2, ...), with 1 and 2 torch threads.

    python benchmarks/bench_async.py [--repeats 2] [--threads 1 2] [--out results.json]

Reported per (threads, k): the median over processes of the median step seconds, steps / s,
and the median share of a step the main thread spent waiting for the producer (join).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(k: int, threads: int, steps: int, skip: int) -> dict:
    import torch

    from opd import pipeline
    from opd.bench.step_workers import _opd_recipe, prompts, tiny_pair
    from opd.build import finish_models
    from opd.config import load_config
    from opd.train import distill

    torch.set_num_threads(threads)
    waits: list[float] = []
    finish = pipeline.Pipeline.finish

    def timed_finish(self):  # the main thread's wait for the producer
        t0 = time.perf_counter()
        finish(self)
        waits.append(time.perf_counter() - t0)

    pipeline.Pipeline.finish = timed_finish
    teacher, student, tok = tiny_pair(0)
    models = finish_models(teacher, student, tok)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp, "prompts.jsonl")
        data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts()))
        cfg = load_config(None, [
            f"output_dir={tmp}/run", f"data.train={data}", f"data.eval={data}",
            "data.eval_count=1", "data.chat_template=false", *_opd_recipe(1.0),
            f"train.steps={steps}", "train.batch_size=16", "train.lr=1e-4",
            "train.progress=false", "sampling.max_new_tokens=32", "sampling.temperature=1.0",
            f"train.threads={threads}", f"train.async_rollouts={k}",
        ])  # fmt: skip
        res = distill(cfg, models=models, evaluate=False, log=lambda *_: None)
    sec = [r["seconds"] for r in res.metrics][skip:]
    wait = waits[skip:] if waits else [0.0] * len(sec)
    return {
        "k": k,
        "threads": threads,
        "seconds_per_step": statistics.median(sec),
        "wait_share": statistics.median(w / s for w, s in zip(wait, sec)),
        "tokens_per_step": statistics.mean(r["tokens"] for r in res.metrics),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.steps, a.skip)))
        return
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    runs = []
    for threads in a.threads:
        for _ in range(a.repeats):
            for k in a.ks:
                cmd = [sys.executable, __file__, "--worker", str(k), str(threads)]
                cmd += ["--steps", str(a.steps), "--skip", str(a.skip)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(runs[-1]), flush=True)
    print("\n| threads | k | s / step | steps / s | vs k=0 | waiting for the producer |")
    print("|---|---|---|---|---|---|")
    for threads in a.threads:
        base = None
        for k in a.ks:
            mine = [r for r in runs if r["threads"] == threads and r["k"] == k]
            sec = statistics.median(r["seconds_per_step"] for r in mine)
            wait = statistics.median(r["wait_share"] for r in mine)
            base = base or sec
            print(f"| {threads} | {k} | {sec:.3f} | {1 / sec:.2f} | {base / sec:.2f}× | "
                  f"{100 * wait:.0f} % |")  # fmt: skip
    if a.out:
        Path(a.out).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
