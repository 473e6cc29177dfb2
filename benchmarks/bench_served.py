"""Served teacher vs local teacher: seconds per training step on the speed benchmark's models.

The teacher (4 layers × 256, char vocabulary, or SmolLM2-size 49,152 output rows with
`--vocab 49152`) and student (2 × 128) are `opd.bench.step_workers.tiny_pair`. The served
side runs `opd serve-teacher` in a second process on 127.0.0.1; the client sends one request
per row (`model.teacher_batch_tokens` = one row's tokens) so that `model.teacher_concurrency`
requests are in flight at once. Each configuration trains `--steps` steps of the same recipe
from the same seed; the table reports the median seconds per step after the first
(warm-up) and the ratio to the local teacher. One process for the trainer, one for the
server, both on this machine's cores: on a 2-core machine they compete, so the served numbers
include that contention (a served teacher on its own GPU would not). All configurations run
in this one invocation, alternating, so the ratios are comparable; absolute times are not.

    python benchmarks/bench_served.py [--steps 8] [--recipes sampled_rkl topk_rkl]
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
sys.path.insert(0, str(ROOT))

from opd.bench.step_workers import tiny_pair  # noqa: E402
from opd.build import finish_models  # noqa: E402
from opd.config import load_config  # noqa: E402
from opd.train import distill  # noqa: E402


def start_server(teacher_dir: Path, port_file: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "opd", "serve-teacher", str(teacher_dir), "--port", "0",
         "--port-file", str(port_file), "--threads", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    return proc


def run(tmp: Path, name: str, teacher, student_dir, tok, prompts, recipe, steps, extra=()):
    from opd.models import load_model

    student, _ = load_model(student_dir)
    args = [
        f"output_dir={tmp / name}",
        f"data.train={prompts}",
        "data.eval_count=0",
        "data.chat_template=false",
        f"method.recipe={recipe}",
        "sampling.max_new_tokens=32",
        "train.batch_size=16",
        f"train.steps={steps}",
        "train.progress=false",
        "train.lr=1e-4",
        *extra,
    ]
    cfg = load_config(None, args)
    if isinstance(teacher, str):
        cfg.model.teacher, cfg.model.student = teacher, str(student_dir)
        res = distill(cfg, evaluate=False, log=lambda *_: None)
    else:
        res = distill(cfg, models=finish_models(teacher, student, tok), evaluate=False,
                      log=lambda *_: None)
    secs = [r["seconds"] for r in res.metrics][1:]
    return statistics.median(secs), res.losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=0)
    ap.add_argument("--recipes", nargs="+", default=["sampled_rkl", "topk_rkl"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="opd-bench-served-"))
    teacher, student, tok = tiny_pair(a.vocab)
    for name, m in (("teacher", teacher), ("student", student)):
        m.save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
    prompts = tmp / "prompts.jsonl"
    with open(prompts, "w") as fh:
        for i in range(64):
            fh.write(json.dumps({"prompt": f"{i % 9}+{i % 7}="}) + "\n")
    server = start_server(tmp / "teacher", tmp / "port")
    url = f"http://127.0.0.1:{(tmp / 'port').read_text().strip()}"
    rows = []
    try:
        for recipe in a.recipes:
            local, local_losses = run(
                tmp, f"{recipe}-local", teacher, tmp / "student", tok, prompts, recipe, a.steps
            )
            rows.append((recipe, "local", "—", local, 1.0, 0.0))
            for c in a.concurrency:
                extra = [f"model.teacher_concurrency={c}", "model.teacher_batch_tokens=64"]
                sec, losses = run(
                    tmp, f"{recipe}-c{c}", url, tmp / "student", tok, prompts, recipe, a.steps,
                    extra,
                )
                diff = max(abs(x - y) for x, y in zip(losses, local_losses))
                rows.append((recipe, "served", c, sec, sec / local, diff))
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines = [
        f"vocab {a.vocab or len(tok)}, batch 16, 32 new tokens, {a.steps} steps (median after "
        "the first); torch threads 1 in the trainer and in the server",
        "",
        "| recipe | teacher | concurrent requests | s / step | × local | max |Δ loss| vs local |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for recipe, kind, c, sec, ratio, diff in rows:
        lines.append(f"| {recipe} | {kind} | {c} | {sec:.3f} | {ratio:.2f} | {diff:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
