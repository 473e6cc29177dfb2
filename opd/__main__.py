"""`python -m opd`: the same as the `opd` command."""

import sys

from opd.cli import main

sys.exit(main())
