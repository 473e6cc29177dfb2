"""Metrics JSONL and the progress display.

`metrics.jsonl` gets one JSON object per optimizer step (and one per evaluation, with
`"event": "eval"`), appended and flushed at once, so a crashed run keeps what it logged.
On resume from the checkpoint of step s, the file is first cut (atomically) to the rows a run
had written when it saved that checkpoint: rows of steps ≤ s (an evaluation at step s, the
final one included, is written before the checkpoint of step s); a restart from step 0 keeps
no row. Unreadable lines (a write torn by a kill) are dropped. So every step row and every
evaluation row appears exactly once however often a run is interrupted and resumed.

Experiment trackers (`train.log_to`, `opd.tracking`) mirror every row written here:
metrics.jsonl stays the source of truth.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tqdm import tqdm


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None, trackers=None):
        self.path = path
        self.trackers = trackers  # opd.tracking.Trackers, or None
        if resume_step is not None and path.exists():
            kept = []
            for line in path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                step = row.get("step", 0) if isinstance(row, dict) else None
                if isinstance(step, int) and step <= resume_step and resume_step > 0:
                    kept.append(line)
            tmp = path.with_name(f".tmp-{path.name}")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, path)
        self._fh = open(path, "a")

    def write(self, row: dict) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()
        if self.trackers is not None:
            self.trackers.log(row)

    def close(self) -> None:
        self._fh.close()
        if self.trackers is not None:
            self.trackers.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """A tqdm bar with live loss and tokens/s (silent when disabled)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "distill"):
        self.bar = tqdm(
            total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True
        )

    def update(self, loss: float, tokens_per_s: float, kl: float | None = None) -> None:
        post = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:.0f}"}
        if kl is not None:
            post["kl"] = f"{kl:.3f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
