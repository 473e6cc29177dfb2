"""`python -m opd.bench quality|speed ARGS`: the same as `opd bench quality|speed ARGS`.

The speed benchmark's fresh worker processes run through here too
(`python -m opd.bench speed --worker ...`).
"""

from __future__ import annotations

import sys

from opd.bench import main_quality, main_speed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("quality", "speed"):
        print("usage: python -m opd.bench {quality,speed} [options]", file=sys.stderr)
        return 2
    return (main_quality if argv[0] == "quality" else main_speed)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
