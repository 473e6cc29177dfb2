"""The demo step in float32 vs bf16 mixed precision, and LoRA (r=8) vs full fine-tuning memory.

The demo configuration (`opd.cli.DEMO_DEFAULTS`: embedded SmolLM2-135M-Instruct teacher, a
15-layer student pruned from it, `on_policy_rkl`, batch 8, ≤ 32 new tokens), a few steps per
setting, each setting in a fresh process (so peak RSS is its own):

    fp32          train.precision=fp32 (the reference)
    bf16          train.precision=bf16 (autocast over float32 master weights, opd/precision.py)
    lora8         model.lora_r=8 (float32), adapters on the attention + MLP projections
    lora8-bf16    both

Reported per setting: every step's seconds (the first includes warm-up: the fast decoder's
check, allocator growth), their median over the steps after the first, the student's trainable
parameters, the bytes of gradients + AdamW moments (read back from the final checkpoint's
optimizer state: 3 × 4 B per trainable parameter), and the peak RSS of the process minus its
RSS once the models were loaded. The machine is shared: times are noisy, compare settings
within one run.

    python benchmarks/bench_precision.py [--steps 3] [--settings fp32 bf16 lora8]
        [--threads 0] [--out benchmarks/results_precision.md]
    python benchmarks/bench_precision.py --checkpointing   # saved-activation memory, gc on/off
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "fp32": [],
    "bf16": ["train.precision=bf16"],
    "lora8": ["model.lora_r=8"],
    "lora8-bf16": ["model.lora_r=8", "train.precision=bf16"],
}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(setting: str, steps: int, threads: int, out_dir: Path) -> dict:
    import torch

    from opd.build import build_models
    from opd.cli import DEMO_DEFAULTS
    from opd.config import load_config
    from opd.train import distill

    overrides = [
        *DEMO_DEFAULTS,
        f"train.steps={steps}",
        f"train.threads={threads}",
        "train.progress=false",
        "train.checkpoint_every=0",
        f"output_dir={out_dir / setting}",
        *SETTINGS[setting],
    ]
    cfg = load_config(None, overrides)
    if threads:
        torch.set_num_threads(threads)
    models = build_models(cfg)
    rss_loaded = _rss_mb()
    res = distill(cfg, models=models, evaluate=False, log=lambda *_: None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    student = res.models.student
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    total = sum(p.numel() for p in student.parameters())
    ckpt = sorted((res.run_dir / "checkpoints").glob("step_*"))[-1]
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    moments = sum(t.numel() * t.element_size() for s in opt.values() for t in s.values() if t.dim())
    seconds = [r["seconds"] for r in res.metrics if "loss" in r]
    return {
        "setting": setting,
        "seconds": seconds,
        "losses": res.losses,
        "trainable": trainable,
        "params": total,
        "grad_and_adam_mb": (moments + 4 * trainable) / 2**20,
        "rss_loaded_mb": rss_loaded,
        "peak_rss_mb": peak,
        "threads": torch.get_num_threads(),
    }


def checkpointing_memory(batch: int = 8, length: int = 96) -> str:
    """Tensors saved for the backward by the demo student's decoder (one forward + backward
    on random ids), without and with train.gradient_checkpointing; loss and time."""
    import time

    import torch

    from opd.build import build_models
    from opd.cli import DEMO_DEFAULTS
    from opd.config import load_config
    from opd.models import decoder_and_head
    from opd.precision import enable_gradient_checkpointing

    lines = []
    for on in (False, True):
        student = build_models(load_config(None, list(DEMO_DEFAULTS))).student
        if on:
            enable_gradient_checkpointing(student)
        student.train()
        dec, head, _ = decoder_and_head(student, verify=False)
        ids = torch.randint(
            0, head.shape[0], (batch, length), generator=torch.Generator().manual_seed(0)
        )
        saved = {}

        def pack(t, saved=saved):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = dec(ids, torch.ones_like(ids))
        loss = (hidden[:, -32:].reshape(-1, hidden.shape[-1]) @ head.T).logsumexp(-1).mean()
        loss.backward()
        lines.append(
            f"gradient_checkpointing={on}: saved for backward {sum(saved.values()) / 2**20:.1f} "
            f"MiB, loss {loss.item():.6f}, forward + backward {time.perf_counter() - t0:.2f} s"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [
        "| setting | step s (all) | median s (after 1st) | trainable params | grads + AdamW MB "
        "| peak RSS − loaded MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        later = r["seconds"][1:] or r["seconds"]
        lines.append(
            f"| {r['setting']} | {', '.join(f'{s:.2f}' for s in r['seconds'])} "
            f"| {statistics.median(later):.2f} | {r['trainable']:,} of {r['params']:,} "
            f"| {r['grad_and_adam_mb']:.1f} | {r['peak_rss_mb'] - r['rss_loaded_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--settings", nargs="+", default=["fp32", "bf16", "lora8"], choices=SETTINGS)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--checkpointing", action="store_true", help="only the gradient checkpointing memory"
    )
    args = ap.parse_args(argv)
    if args.checkpointing:
        print(checkpointing_memory())
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.threads, args.dir)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            cmd = [sys.executable, __file__, "--worker", setting, "--steps", str(args.steps)]
            cmd += ["--threads", str(args.threads), "--dir", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{setting}: {rows[-1]['seconds']}", file=sys.stderr)
    import torch

    text = (
        f"Demo step (embedded SmolLM2-135M teacher, 15-layer student, batch 8, ≤ 32 new "
        f"tokens), {args.steps} steps per setting, torch {torch.__version__}, "
        f"{rows[0]['threads']} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
        f", {platform.processor() or platform.machine()}:\n\n{table(rows)}\n"
    )
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
