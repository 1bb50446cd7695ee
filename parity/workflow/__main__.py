"""`python -m parity.workflow windows ACTION ...`: the windows workflow without going through parity.cli."""

from __future__ import annotations

import sys

from parity.workflow.cli import main

sys.exit(main())
