"""Peak memory and time: chunked divergences vs the materialized (N, V) logits path.

For each divergence and each N, two configurations run forward + backward on the same
random inputs (float32, CPU):

    materialized  logits_s = h_s @ W_s.T (with grad), logits_t = h_t @ W_t.T (no grad),
                  values = divergence(name, logits_s, logits_t), values.mean().backward()
    chunked       values = chunked_divergence(name, h_s, W_s, h_t, W_t, chunk_size=C),
                  values.mean().backward()

at SmolLM2's sizes: V = 49,152, D = 576 for both models. One N×V float32 tensor at N = 4096
is 4096 × 49,152 × 4 B = 805 MB.

How memory is measured (honestly, on CPU): every configuration runs in a fresh subprocess.
The worker allocates the inputs, runs a tiny warm-up (N = 8) so kernels and thread pools
exist, then resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`, Linux)
and records the current RSS as the baseline. After one forward + backward it reads the peak
(VmHWM). The reported number is peak − baseline: every byte the step itself touched at its
high-water mark, whether allocated by torch or not, and nothing the inputs already held. Big
tensors are mmap-backed by glibc and returned on free, so RSS tracks live tensors. Where
clear_refs is unavailable the worker falls back to ru_maxrss (the same high-water mark,
without the reset). The W_s gradient (V×D = 113 MB) is in both numbers.

Time is wall-clock of forward + backward: the median of --repeats runs (the first, memory
run included). Each worker saves its (N,) values; the parent reports max |chunked −
materialized| over them. --extra-chunk-size adds a chunked run with another chunk size at
the largest N (the materialized run is shared).

Cost: per divergence and N the two configurations do 10 head matmuls of 2·N·D·V flops (4
materialized, 6 chunked: the backward recomputes both models' logits), 232 GFLOP each at
N = 4096, plus a fresh Python + torch start per configuration. Measured on a shared 2-core
EPYC (load average 4 to 9): the six §1 divergences at the full setting took about 23 minutes
of worker time; all twelve registered divergences with --extra-chunk-size 512, 80 minutes.
For a quicker look use fewer N or divergences (e.g. --n 4096 --divergences forward_kl).

Usage:
    python benchmarks/bench_chunked.py --n 512 2048 4096 --divergences all \
        --chunk-size 1024 --out benchmarks/results_chunked.md
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


def worker(args: argparse.Namespace) -> dict:
    """One configuration in this (fresh) process; returns the measurements."""
    import torch

    from opd.bench.loss_worker import loss_inputs
    from opd.bench.memory import peak_kb, reset_peak
    from opd.losses import DIVERGENCES, chunked_divergence, divergence

    torch.set_num_threads(args.threads)
    params = {"k": 16} if args.divergence == "topk_reverse_kl" else {}
    assert args.divergence in DIVERGENCES, args.divergence
    h_s, w_s, h_t, w_t = loss_inputs(args.n)

    def step(hidden_s, hidden_t):
        if args.mode == "chunked":
            values = chunked_divergence(
                args.divergence, hidden_s, w_s, hidden_t, w_t, chunk_size=args.chunk_size, **params
            )
        else:
            logits_s = hidden_s @ w_s.T
            with torch.no_grad():
                logits_t = hidden_t @ w_t.T
            values = divergence(args.divergence, logits_s, logits_t, **params)
        values.mean().backward()
        return values.detach()

    step(h_s[:8].detach().requires_grad_(), h_t[:8])  # warm-up: kernels, thread pools
    w_s.grad = None
    baseline_kb = reset_peak()
    times = []
    for i in range(args.repeats):
        w_s.grad = h_s.grad = None
        start = time.perf_counter()
        values = step(h_s, h_t)
        times.append(time.perf_counter() - start)
        if i == 0:
            peak_mb = (peak_kb() - baseline_kb) / 1024
    if args.values_out:
        torch.save(values, args.values_out)  # the parent compares chunked with materialized
    return {
        "divergence": args.divergence,
        "n": args.n,
        "mode": args.mode,
        "chunk_size": args.chunk_size if args.mode == "chunked" else None,
        "peak_mb": peak_mb,  # MiB (the kernel reports kB = KiB)
        "time_s": statistics.median(times),
    }


def run_one(
    divergence: str, n: int, mode: str, chunk_size: int, values_out: Path, args: argparse.Namespace
) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", "--mode", mode, "--divergence", divergence,
        "--n", str(n), "--chunk-size", str(chunk_size), "--repeats", str(args.repeats),
        "--threads", str(args.threads), "--values-out", str(values_out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {divergence} N={n} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], target_n: int) -> str:
    lines = [
        "| divergence | N | chunk | materialized peak (MiB) | chunked peak (MiB) "
        "| chunked / materialized | materialized time (s) | chunked time (s) "
        "| max abs value diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["chunked"]["peak_mb"] / r["materialized"]["peak_mb"]
        mark = (" ✓" if ratio <= 0.25 else " ✗") if r["n"] == target_n else ""
        lines.append(
            f"| {r['divergence']} | {r['n']} | {r['chunked']['chunk_size']} "
            f"| {r['materialized']['peak_mb']:.0f} | {r['chunked']['peak_mb']:.0f} "
            f"| {ratio:.3f}{mark} | {r['materialized']['time_s']:.2f} "
            f"| {r['chunked']['time_s']:.2f} | {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--divergences", nargs="+", default=["all"], help="names, or 'all'")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument(
        "--extra-chunk-size", type=int, default=None, help="also run this chunk size at max N"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs; median reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["materialized", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--divergence", help=argparse.SUPPRESS)
    parser.add_argument("--values-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.n = args.n[0]
        print(json.dumps(worker(args)))
        return

    sys.path.insert(0, str(ROOT))  # run as a script from a checkout (lazy imports: after this)
    from opd.bench.environment import machine
    from opd.bench.loss_worker import HIDDEN, VOCAB
    from opd.losses import DIVERGENCES

    names = sorted(DIVERGENCES) if args.divergences == ["all"] else args.divergences
    header = machine()
    print(header, flush=True)
    started = time.perf_counter()
    command = (
        f"benchmarks/bench_chunked.py --n {' '.join(map(str, args.n))} --divergences "
        f"{' '.join(args.divergences)} --chunk-size {args.chunk_size} --repeats {args.repeats}"
        + (f" --extra-chunk-size {args.extra_chunk_size}" if args.extra_chunk_size else "")
    )
    rows: list[dict] = []

    def write_report(done: bool) -> None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        status = (
            f"total {(time.perf_counter() - started) / 60:.1f} min, load average at end {load:.2f}"
            if done
            else "PARTIAL: still running"
        )
        report = (
            "# Chunked vs materialized divergence: peak memory and time\n\n"
            f"Generated by `{command}`.\n\n"
            f"Machine: {header}; {args.threads} torch threads; {status}.\n\n"
            f"V = {VOCAB:,}, D = {HIDDEN} (both models), float32, forward + backward. Peak = "
            "peak RSS − RSS after allocating the inputs, each configuration in a fresh process "
            f"(see the script's docstring). Time = median of {args.repeats} run(s). ✓/✗: "
            f"chunked peak ≤ ¼ of materialized at N = {max(args.n)}.\n\n"
            + table(rows, max(args.n))
            + "\n"
        )
        if args.out:
            args.out.write_text(report)
        elif done:
            print(report)

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for n in args.n:
                chunk_sizes = [args.chunk_size]
                if args.extra_chunk_size and n == max(args.n):
                    chunk_sizes.append(args.extra_chunk_size)
                materialized = run_one(name, n, "materialized", 0, Path(tmp, "m.pt"), args)
                reference = torch.load(Path(tmp, "m.pt"))
                for chunk_size in chunk_sizes:
                    chunked = run_one(name, n, "chunked", chunk_size, Path(tmp, "c.pt"), args)
                    diff = float((torch.load(Path(tmp, "c.pt")) - reference).abs().max())
                    row = dict(divergence=name, n=n, materialized=materialized, chunked=chunked)
                    rows.append({**row, "max_abs_diff": diff})
                    m, c = materialized, chunked
                    print(
                        f"{name:16s} N={n:5d} C={chunk_size:5d}  peak {m['peak_mb']:7.0f} -> "
                        f"{c['peak_mb']:6.0f} MiB ({c['peak_mb'] / m['peak_mb']:.3f})  time "
                        f"{m['time_s']:6.2f} -> {c['time_s']:6.2f} s  |diff| {diff:.1e}",
                        flush=True,
                    )
                    write_report(done=False)
    write_report(done=True)
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
