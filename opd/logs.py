"""Metrics JSONL and the progress display.

`metrics.jsonl` gets one JSON object per optimizer step (and one per evaluation, with
`"event": "eval"`), appended and flushed at once, so a crashed run keeps what it logged.
On resume, lines past the checkpoint's step are dropped first so the file stays consistent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", 0) <= resume_step:
                    kept.append(line)
            path.write_text("".join(k + "\n" for k in kept))
        self._fh = open(path, "a")

    def write(self, row: dict) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


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
