"""``python -m positiond.ctl``: the same as ``posctl``."""

from __future__ import annotations

import sys

from positiond.ctl.cli import main

__all__: list[str] = []

sys.exit(main())
