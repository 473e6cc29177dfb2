"""Memory per process: a 2-process DDP run against a 2-process FSDP run (`train.fsdp=true`).

A randomly initialised Llama student of about 21 M parameters (hidden 512, 8 layers; the
tiny character vocabulary) is distilled from a tiny teacher for 2 steps (gkd, batch 2 per
process, 5 new tokens) under `torchrun --nproc_per_node 2` (gloo, this CPU), once with DDP
and once with FSDP. Each process reports, after its last optimizer step:

    state MB     bytes of the tensors training keeps per process, counted from the optimizer:
                 its parameters, their gradients and the AdamW moments (a DTensor counts its
                 local shard), plus, under FSDP, the unsharded inference copy (opd.fsdp)
    peak RSS MB  the process's peak resident memory (`ru_maxrss`): everything, Python, torch,
                 the teacher, activations, DDP's gradient buckets, communication buffers;
                 once after the last optimizer step (training) and once at the end (the
                 final checkpoint and the saved student included)

Both launches run with MALLOC_MMAP_THRESHOLD_=65536 (glibc), so that buffers of 10 MB that
were freed go back to the system; with glibc's default dynamic threshold the FSDP run's RSS
was 100-250 MB above what its tensors hold (freed all-gather buffers kept in the heap).

    python benchmarks/bench_fsdp_memory.py [--out benchmarks/results_fsdp_memory.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _worker(base: Path, mode: str) -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from opd.config import load_config
    from opd.train import distill

    torch.set_num_threads(1)
    seen: dict = {}

    def count(opt, args, kwargs):
        ps = [p for g in opt.param_groups for p in g["params"]]
        total = sum(_bytes(p) for p in ps) + sum(_bytes(p.grad) for p in ps if p.grad is not None)
        total += sum(_bytes(v) for s in opt.state.values() for v in s.values() if v.dim())
        seen["optimizer"] = total
        seen["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    register_optimizer_step_post_hook(count)
    cfg = load_config(
        None,
        [
            f"model.teacher={base / 'teacher'}",
            f"model.student={base / 'student'}",
            f"data.train={base / 'prompts.jsonl'}",
            "data.eval_count=0",
            "data.chat_template=false",
            "method.recipe=gkd",
            "train.steps=2",
            "train.batch_size=2",
            "train.progress=false",
            "sampling.max_new_tokens=5",
            f"train.fsdp={'true' if mode == 'fsdp' else 'false'}",
            f"output_dir={base / mode}",
        ],
    )
    res = distill(cfg, evaluate=False, log=lambda *a: None)
    copy = sum(_bytes(p) for p in res.models.student.parameters()) if mode == "fsdp" else 0
    row = {
        "mode": mode,
        "rank": int(os.environ["RANK"]),
        "state_mb": (seen["optimizer"] + copy) / 2**20,
        "student_mb": sum(_bytes(p) for p in res.models.student.parameters()) / 2**20,
        "train_rss_mb": seen["rss"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    with open(base / "rows.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _setup(base: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from opd.tiny import char_tokenizer, tiny_llama
    from tests.helpers import write_prompts

    tok = char_tokenizer()
    teacher = tiny_llama(len(tok), hidden=64, layers=2, seed=1)
    student = tiny_llama(len(tok), hidden=512, layers=8, heads=8, seed=2)
    for name, m in (("teacher", teacher), ("student", student)):
        m.save_pretrained(base / name)
        tok.save_pretrained(base / name)
    write_prompts(base / "prompts.jsonl", n=16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--worker", nargs=2, metavar=("BASE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(Path(args.worker[0]), args.worker[1])
    base = Path(tempfile.mkdtemp(prefix="opd-fsdp-mem-"))
    _setup(base)
    # a fixed mmap threshold: glibc's dynamic one keeps freed 10 MB buffers (FSDP's gathered
    # layers, DDP's buckets) in the heap, and RSS then counts memory no tensor holds
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for mode in ("ddp", "fsdp"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            __file__, "--worker", str(base), mode,
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-8000:])
    rows = [json.loads(x) for x in (base / "rows.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: (r["mode"], r["rank"]))
    lines = [
        f"student {rows[0]['student_mb']:.1f} MB of float32 weights; 2 processes, gkd, 2 steps",
        "",
        "| mode | rank | state MB (weights + grads + AdamW [+ inference copy]) "
        "| peak RSS MB, training | peak RSS MB, with the checkpoint and saving |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['rank']} | {r['state_mb']:.1f} | {r['train_rss_mb']:.0f} "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
