"""Performance against the machine: FLOPs per demo step / step time / measured matmul peak.

1. Peak: the best of 5 timed float32 (and bfloat16) matmuls of 2048 × 2048 × 2048 with
   torch's default thread count (2 · 2048³ FLOPs each): the rate this CPU's BLAS reaches on a
   large, well-shaped product, the practical ceiling of every model matmul here.
2. FLOPs per demo step, counted per component from a finished demo run's metrics.jsonl
   (completion tokens C per step, as logged) and the demo's mean prompt length P (the shipped
   arithmetic prompts with SmolLM2's chat template), B = 8 rows, N as `opd.bench.flops`
   counts it (every parameter but the input embedding; the head is tied):

       student generation      2 · N_s · B · (P + C)      (prefill + one forward per token)
       teacher scoring         2 · N_t · B · (P + C)
       student forward+backward 6 · N_s · B · (P + C)
       loss                    ≈ 10 · B · C · V          (softmax/log-softmax and the
                                                          divergence over V per token, both
                                                          models, forward and backward)

   Deviation: the student's forward+backward runs only on the completion rows' head (opd
   projects only completion positions), so 6 · N_s · B · (P + C) slightly overcounts the head.
3. Utilisation = FLOPs per step / median step seconds / peak of the run's precision: the
   float32 peak for `train.precision=fp32`, the bfloat16 one for `train.precision=bf16`
   (read from the run's config.yaml; its matmuls run in bfloat16 under autocast).

    python benchmarks/bench_peak.py RUN_DIR      # RUN_DIR: an `opd demo` run folder
        [--threads N]   # the run's train.threads (peak measured with as many threads)
        [--skip-bf16]   # no bfloat16 peak (minutes where bf16 is emulated)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

N_TEACHER, N_STUDENT, VOCAB = 134_515_008, 81_413_568, 49_152


def peak(dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def mean_prompt_tokens() -> float:
    from opd.cli import DEMO_DEFAULTS
    from opd.config import load_config
    from opd.data.sets import build_data
    from opd.models.embedded import embedded_cache
    from opd.models.loading import load_tokenizer

    cfg = load_config(None, DEMO_DEFAULTS)
    data = build_data(cfg, load_tokenizer(embedded_cache()))
    return statistics.mean(len(e.prompt_ids) for e in data.train)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--skip-bf16", action="store_true", help="no bfloat16 peak (minutes on AVX2)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)  # as the run's train.threads
    rows = [json.loads(x) for x in Path(a.run_dir, "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "seconds" in r and "event" not in r]
    sec = statistics.median(r["seconds"] for r in steps)
    c = statistics.mean(r["tokens"] for r in steps) / a.batch
    prompt = mean_prompt_tokens()
    tokens = a.batch * (prompt + c)
    parts = {
        "student generation": 2 * N_STUDENT * tokens,
        "teacher scoring": 2 * N_TEACHER * tokens,
        "student forward + backward": 6 * N_STUDENT * tokens,
        "loss": 10 * a.batch * c * VOCAB,
    }
    total = sum(parts.values())
    fp32, bf16 = peak(torch.float32), float("nan") if a.skip_bf16 else peak(torch.bfloat16)
    print(f"torch threads {torch.get_num_threads()}; P = {prompt:.1f}, C = {c:.1f}, B = {a.batch}")
    print(f"matmul peak: float32 {fp32 / 1e9:.1f} GFLOP/s, bfloat16 {bf16 / 1e9:.1f} GFLOP/s")
    print("\n| component | GFLOP per step |\n|---|---:|")
    for k, v in parts.items():
        print(f"| {k} | {v / 1e9:.1f} |")
    print(f"| **total** | **{total / 1e9:.1f}** |")
    bf16_run = run_precision(a.run_dir) == "bf16"
    ref, name = (bf16, "bfloat16") if bf16_run else (fp32, "float32")
    print(f"\nmedian step {sec:.2f} s over {len(steps)} steps -> {total / sec / 1e9:.1f} GFLOP/s "
          f"= {100 * total / sec / ref:.0f} % of the {name} matmul peak "
          f"(train.precision={'bf16' if bf16_run else 'fp32'})")  # fmt: skip


def run_precision(run_dir: str) -> str:
    """The run's train.precision (fp32 when its config.yaml does not say)."""
    import yaml

    cfg = yaml.safe_load(Path(run_dir, "config.yaml").read_text()) or {}
    return (cfg.get("train") or {}).get("precision", "fp32")


if __name__ == "__main__":
    main()
