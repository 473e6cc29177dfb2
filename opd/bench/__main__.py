"""`python -m opd.bench quality|speed|scaling ARGS`: the same as `opd bench ... ARGS`.

`main` is also what `opd bench` runs (opd/cli.py): the one table of the benchmarks. The
speed benchmark's fresh worker processes run through here too
(`python -m opd.bench speed --worker ...`).
"""

from __future__ import annotations

import sys

from opd.bench import main_quality, main_speed
from opd.bench.scaling import main as main_scaling

BENCHMARKS = {"quality": main_quality, "speed": main_speed, "scaling": main_scaling}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m opd.bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    return BENCHMARKS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
