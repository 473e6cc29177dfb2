"""Peak resident memory of this process, for the benchmarks (Linux /proc; getrusage elsewhere).

    base = reset_peak()            # after the inputs exist
    ... work ...
    peak_mb = (peak_kb() - base) / 1024
"""

from __future__ import annotations

import resource
from pathlib import Path


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_kb() -> int:
    """Peak RSS in kB since start or the last `reset_peak`."""
    hwm = _status_kb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak() -> int:
    """Reset the peak-RSS counter and return the baseline in kB: the current RSS, or, where the
    counter cannot be reset, the peak so far (so peak − baseline counts only new growth)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return peak_kb()
    return _status_kb("VmRSS") or peak_kb()
