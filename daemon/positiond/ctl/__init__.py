"""``posctl``, the operator's tool: ``positiond.ctl:main`` (``python -m positiond.ctl``).

Modules: :mod:`.cli` (the command line and ``main``), :mod:`.locate` (which database and
socket), :mod:`.access` (read-only reads; writes through the daemon or directly under its lock),
:mod:`.read` (crashed, sessions, positions, events, status), :mod:`.change` (verify, resolve,
prune), :mod:`.orphans` (orphans, resolve-orphan), :mod:`.keys` (CURVE certificates),
:mod:`.render` and :mod:`.layout` (the tables), :mod:`.watch` and :mod:`.board` (``posctl watch``:
the subscription and the live board).
"""

from __future__ import annotations

from positiond.ctl.cli import main

__all__ = ["main"]
