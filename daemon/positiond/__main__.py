"""``python -m positiond`` is the ``positiond`` command."""

import sys

from positiond.cli import main

sys.exit(main())
