"""The per-process body of tests/test_ddp.py, launched by `torchrun --nproc_per_node N`.

Reads a JSON list of jobs ({"overrides": [...], "resume": RUN_DIR or null, "stop_after": int
or null, "fail_rank1_at": step or null}) and runs `opd.train.distill` for each, in one process
group (initialised here once, so the jobs share the start-up cost). Rank 0 appends one JSON
line per finished job to argv[2]: {"losses": [...], "run_dir": ...}. `fail_rank1_at`: rank 1
raises NonFiniteError in that step (0-based) while rank 0 waits in the gradient all-reduce.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as tdist

from opd.config import load_config, load_run_config
from opd.train import distill


def main(jobs_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo")
    for job in json.loads(open(jobs_file).read()):
        if job.get("fail_rank1_at") is not None and tdist.get_rank() == 1:
            _fail_at(job["fail_rank1_at"])
        if job.get("resume"):
            cfg = load_run_config(job["resume"], job["overrides"])
        else:
            cfg = load_config(None, job["overrides"])
        res = distill(
            cfg,
            resume=bool(job.get("resume")),
            stop_after=job.get("stop_after"),
            evaluate=False,
            log=lambda *a: None,
        )
        row = {"losses": res.losses, "run_dir": str(res.run_dir), "main": res.is_main}
        if tdist.get_rank() == 0:
            with open(out_file, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    tdist.barrier()
    tdist.destroy_process_group()


def _fail_at(step: int) -> None:
    import opd.step

    real = opd.step.micro_step

    def failing(method, models, rollout, ctx, *args, **kwargs):
        if ctx.step == step:
            raise opd.step.NonFiniteError(f"step {step + 1}: injected failure on rank 1")
        return real(method, models, rollout, ctx, *args, **kwargs)

    opd.step.micro_step = failing


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
