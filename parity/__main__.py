"""`python -m parity`: same as the `parity` command."""

from __future__ import annotations

import sys

from parity.cli import main

sys.exit(main())
