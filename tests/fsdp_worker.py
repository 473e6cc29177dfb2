"""tests/ddp_worker.py (the same jobs file and output) with the FSDP sharding recorded.

Rank 0 appends one JSON line per sharded run to argv[3]: each parameter of the FSDP root
(`opd.fsdp.LossForward`) as [full shape, rank 0's local shape, type], and the types of the
unsharded inference copy's parameters (`run.models.student`).
"""

from __future__ import annotations

import json
import sys

import opd.fsdp
from tests import ddp_worker


def _record(path: str) -> None:
    real = opd.fsdp.shard_run

    def recording(run, dist):
        root = real(run, dist)
        if dist.rank == 0:
            params = {
                n: [list(p.shape), list(p.to_local().shape), type(p).__name__]
                for n, p in root.named_parameters()
            }
            plain = sorted({type(p).__name__ for p in run.models.student.parameters()})
            with open(path, "a") as fh:
                fh.write(json.dumps({"root": params, "plain": plain}) + "\n")
        return root

    opd.fsdp.shard_run = recording


if __name__ == "__main__":
    _record(sys.argv[3])
    ddp_worker.main(sys.argv[1], sys.argv[2])
