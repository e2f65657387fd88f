"""A fake OpenAlgo REST API on 127.0.0.1 for trying ``posctl verify --openalgo`` without a broker.

The server is the test suite's own stand-in (bench/fake_openalgo.py), run from a checkout:

    python examples/fake_openalgo.py --port 5000 --api-key KEY --positionbook book.json

See examples/README.md for the crash -> verify walk-through.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__: list[str] = []

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for tests/
    from bench.fake_openalgo import main

    sys.exit(main())
