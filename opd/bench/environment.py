"""One line about the machine a benchmark ran on, recorded at its start and end."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    """One line about this machine: cores, CPU model, torch and Python, current load."""
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
