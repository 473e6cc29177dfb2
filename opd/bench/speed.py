"""What distillation costs: opd vs TRL per training step, and the chunked-loss microbenchmark.

1. Step benchmark (`opd.bench.step_workers`): opd (`distill` with `gkd`, λ = 1) and TRL's
   `DistillationTrainer` train the same tiny student against the same teacher with the same
   settings; seconds / step, completion tokens / s (and per CPU second) and peak memory, in
   `--repeats` fresh processes per side, alternating.
2. Loss microbenchmark (`opd.bench.loss_worker`): one forward + backward of a per-token
   generalized JSD at SmolLM2's sizes through opd's chunked, one-pass and materialized paths
   and TRL's chunked kernel; peak memory, seconds and agreement with the materialized values.

Each measurement runs in a fresh process (`python -m opd.bench speed --worker ...`), so
peak memory is that configuration's alone. The workers' modules state what is measured and
the deviations; `opd.bench.plots.speed_markdown` renders the tables.
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

import torch

from opd.bench.environment import machine
from opd.bench.loss_worker import VOCAB, worker_loss
from opd.bench.plots import speed_markdown
from opd.bench.step_workers import (
    INSTALL_HINT,
    SIDES,
    side_name,
    trl_version,
    worker_opd,
    worker_trl,
)
from opd.cli import _Parser as CliParser  # a bad option: one `opd: error:` line, exit 2


def _spawn(args: list[str]) -> dict:
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }
    out = subprocess.run(
        [sys.executable, "-m", "opd.bench", "speed", "--worker", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {args[:1]} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_bench(a, log=print) -> dict:
    """opd and TRL (if importable) alternately, `repeats` times each, in fresh processes.

    Per side, the reported numbers are the medians over repeats (peak memory: the largest).
    """
    flags = [
        "--steps",
        str(a.steps),
        "--skip",
        str(a.skip),
        "--batch",
        str(a.batch),
        "--new-tokens",
        str(a.new_tokens),
        "--beta",
        str(a.beta),
        "--lr",
        str(a.lr),
        "--temperature",
        str(a.temperature),
        "--threads",
        str(a.threads),
        "--vocab",
        str(a.vocab),
    ]
    sides = [s for s in a.sides if s != "trl" or trl_version()]
    if "trl" in a.sides and "trl" not in sides:
        log(f"TRL is not installed: only opd's numbers are reported ({INSTALL_HINT} adds it)")
    runs = {side: [] for side in sides}
    for _ in range(a.repeats):
        for side in sides:
            worker = ["trl"] if side == "trl" else ["opd", "--backend", SIDES[side]]
            runs[side].append(_spawn([*worker, *flags]))
    out = {"vocab": a.vocab or "char (105)"}
    log(f"step benchmark, output vocabulary {out['vocab']}:")
    for side, rs in runs.items():
        out[side] = {
            "repeats": rs,
            **{
                k: statistics.median(r[k] for r in rs)
                for k in (
                    "seconds_per_step",
                    "tokens_per_s",
                    "tokens_per_step",
                    "cpu_seconds_per_step",
                    "tokens_per_cpu_s",
                )
            },
            "peak_mb": max(r["peak_mb"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
        }
        name = side_name(side, trl_version(), rs[0].get("trainer"))
        log(
            f"{name}: {out[side]['seconds_per_step']:.3f} s/step, "
            f"{out[side]['tokens_per_s']:.0f} completion tokens/s "
            f"({out[side]['tokens_per_cpu_s']:.0f} per CPU second), "
            f"peak +{out[side]['peak_mb']:.0f} MB (RSS {out[side]['peak_rss_mb']:.0f} MB)"
        )
    if "trl" in out:
        out["speedup_tokens_per_s"] = out["opd"]["tokens_per_s"] / out["trl"]["tokens_per_s"]
        out["speedup_tokens_per_cpu_s"] = (
            out["opd"]["tokens_per_cpu_s"] / out["trl"]["tokens_per_cpu_s"]
        )
        out["peak_ratio"] = out["opd"]["peak_mb"] / max(out["trl"]["peak_mb"], 1e-9)
        log(
            f"opd / TRL completion tokens/s: {out['speedup_tokens_per_s']:.2f}x (per CPU second "
            f"{out['speedup_tokens_per_cpu_s']:.2f}x); peak memory opd / TRL: {out['peak_ratio']:.2f}"
        )
    return out


def loss_bench(a, log=print) -> list[dict]:
    modes = ["opd_materialized", "opd_chunked", "opd_one_pass"] + (
        ["trl_chunked"] if trl_version() else []
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.loss_n:
            ref = None
            for mode in modes:
                values = Path(tmp, f"{mode}.pt")
                r = _spawn(
                    [
                        "loss",
                        "--mode",
                        mode,
                        "--n",
                        str(n),
                        "--beta",
                        str(a.loss_beta),
                        "--chunk-size",
                        str(a.chunk_size),
                        "--threads",
                        str(a.threads),
                        "--values-out",
                        str(values),
                    ]
                )
                v = torch.load(values)
                ref = v if ref is None else ref
                r["max_abs_diff"] = float((v - ref).abs().max())
                rows.append(r)
                log(
                    f"loss N={n:5d} {mode:17s} peak {r['peak_mb']:7.0f} MB  {r['seconds']:6.2f} s"
                    f"  |Δ vs materialized| {r['max_abs_diff']:.1e}"
                )
    return rows


def _parser() -> argparse.ArgumentParser:
    p = CliParser(prog="opd bench speed", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12, help="training steps per process")
    p.add_argument("--skip", type=int, default=2, help="first steps left out (warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per side, alternating")
    p.add_argument(
        "--sides",
        nargs="+",
        choices=sorted(SIDES),
        default=["opd", "trl"],
        help="what to run: opd (default decoding), opd-hf (opd with Hugging Face generate), trl",
    )
    p.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--beta", type=float, default=1.0, help="generalized JSD β of both sides")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--vocabs",
        type=int,
        nargs="+",
        default=[0, VOCAB],
        help="output vocabularies of the step benchmark (0: the 105-char tokenizer's)",
    )
    p.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (on a busy machine > 1 can be far slower)",
    )
    p.add_argument(
        "--loss-n",
        type=int,
        nargs="*",
        default=[512, 2048, 4096],
        help="rows of the loss microbenchmark (none: skip it)",
    )
    p.add_argument("--loss-beta", type=float, default=0.5)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--out", default=None, help="write speed.json here (a folder)")
    p.add_argument("--worker", choices=["opd", "trl", "loss"], help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--values-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.worker:
        fn = {"opd": worker_opd, "trl": worker_trl, "loss": worker_loss}[a.worker]
        print(json.dumps(fn(a)))
        return 0
    t0 = time.perf_counter()
    result = {"machine_at_start": machine(), "trl": trl_version(), "settings": vars(a)}
    print(result["machine_at_start"], flush=True)
    result["step"] = [step_bench(argparse.Namespace(**{**vars(a), "vocab": v})) for v in a.vocabs]
    result["loss"] = loss_bench(a) if a.loss_n else []
    result["machine_at_end"] = machine()
    result["wall_seconds"] = time.perf_counter() - t0
    print(speed_markdown(result))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "speed.json").write_text(json.dumps(result, indent=1))
        (Path(a.out) / "speed.md").write_text(speed_markdown(result) + "\n")
        print(f"wrote {Path(a.out) / 'speed.json'} and speed.md")
    return 0
