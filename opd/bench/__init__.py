"""Benchmarks: what distillation buys (`quality`) and what it costs (`speed`).

- `opd.bench.quality`: off-policy vs on-policy recipes at equal estimated FLOPs on a
  synthetic task with a from-scratch teacher; accuracy and held-out teacher KL over seeds.
- `opd.bench.speed`: opd vs TRL on identical tiny models (seconds/step, completion
  tokens/s, peak memory), and the chunked-loss microbenchmark.

Command-line entry points: `main_quality(argv)` and `main_speed(argv)`.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """One line about this machine: cores, CPU model, torch and Python, current load."""
    import torch

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (
        f"{os.cpu_count()} cores ({model}), torch {torch.__version__}, "
        f"Python {platform.python_version()}, load average {load[0]:.2f} / {load[1]:.2f} / "
        f"{load[2]:.2f} (1/5/15 min)"
    )


def main_quality(argv: list[str] | None = None) -> int:
    from opd.bench.quality import main

    return main(argv)


def main_speed(argv: list[str] | None = None) -> int:
    from opd.bench.speed import main

    return main(argv)


__all__ = ["machine", "main_quality", "main_speed"]
