"""Tokens/s of a full training step on tiny models (CPU), chunked vs materialized loss path.

A "step" is everything the loop does per optimizer step: rollout (generation for on-policy
recipes), student forward/backward, teacher forward, optimizer. Completion tokens per
second = counted completion tokens / wall seconds of the step, median over steps after a
warm-up. Both paths run in this one process, one after the other, so the ratio is
meaningful even on a noisy shared machine; absolute numbers are not.

    python benchmarks/bench_step.py [--steps 12] [--out benchmarks/results_step.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from opd.build import finish_models
from opd.config import load_config
from opd.tiny import char_tokenizer, tiny_llama
from opd.train import distill


def write_prompts(path: Path, n: int = 64) -> Path:
    import json
    import random

    rng = random.Random(0)
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            fh.write(
                json.dumps(
                    {"prompt": f"{a}+{b}=", "completion": f"{a + b} is the sum of {a} and {b}"}
                )
                + "\n"
            )
    return path


def run(recipe: str, loss_path: str, steps: int, batch: int, new_tokens: int, tmp: Path) -> dict:
    tok = char_tokenizer()
    teacher = tiny_llama(len(tok), hidden=256, layers=4, seed=1)
    student = tiny_llama(len(tok), hidden=128, layers=2, seed=2)
    models = finish_models(teacher, student, tok)
    data = write_prompts(tmp / "p.jsonl")
    cfg = load_config(
        None,
        [
            f"output_dir={tmp / f'{recipe}-{loss_path}'}",
            f"data.train={data}",
            f"data.eval={data}",
            "data.chat_template=false",
            f"train.steps={steps}",
            f"train.batch_size={batch}",
            f"sampling.max_new_tokens={new_tokens}",
            "train.progress=false",
            f"train.loss_path={loss_path}",
            f"method.recipe={recipe}",
        ],
    )
    res = distill(cfg, models=models, evaluate=False, log=lambda *_: None)
    rows = res.metrics[2:]  # drop warm-up steps
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "seconds_per_step": statistics.median(r["seconds"] for r in rows),
        "tokens_per_step": statistics.median(r["tokens"] for r in rows),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results_step.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Tiny Llama teacher (4×256) and student (2×128), char vocab (105), "
        f"batch {args.batch}, up to {args.new_tokens} new tokens, median of {args.steps - 2} steps.",
        "",
        "| recipe | loss path | completion tokens/s | s/step | tokens/step |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as d:
        for recipe in ("on_policy_rkl", "supervised_kd"):
            for path in ("chunked", "materialized"):
                r = run(recipe, path, args.steps, args.batch, args.new_tokens, Path(d))
                lines.append(
                    f"| {recipe} | {path} | {r['tokens_per_s']:.0f} | {r['seconds_per_step']:.3f} | {r['tokens_per_step']:.0f} |"
                )
                print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
