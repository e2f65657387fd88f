"""``python -m positiond`` is the ``positiond`` command."""

import sys

from positiond.cli import main

__all__: list[str] = []

sys.exit(main())
