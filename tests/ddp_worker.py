"""The per-process body of tests/test_ddp.py, launched by `torchrun --nproc_per_node N`.

Reads a JSON list of jobs ({"overrides": [...], "resume": RUN_DIR or null, "stop_after": int
or null}) and runs `opd.train.distill` for each, in one process group (initialised here once,
so the jobs share the start-up cost). Rank 0 writes one JSON line per job to argv[2]:
{"losses": [...], "run_dir": ...}.
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
    rows = []
    for job in json.loads(open(jobs_file).read()):
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
        rows.append({"losses": res.losses, "run_dir": str(res.run_dir), "main": res.is_main})
    if tdist.get_rank() == 0:
        with open(out_file, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
