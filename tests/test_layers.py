"""The daemon's parts stay apart: the engine knows nothing of the daemon around it.

- the engine and its pure helpers import no I/O module of the daemon (server, router,
  listener, store, ...) and neither zmq, asyncio nor sqlite3;
- nothing outside the engine writes into it (its peers, its liveness timeout, its counters,
  a health callable): it is changed through its methods only, and reads no clock through it;
- each component owns its counters; the daemon's health merges them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import positiond
from positiond.config import Config
from positiond.engine import Engine
from positiond.server import Daemon

PACKAGE = Path(positiond.__file__).parent
PURE = (
    "engine.py", "handbacks.py", "writequeue.py", "progress.py", "model.py", "commands.py",
    "liveness.py",
)  # fmt: skip
DAEMON_IO = {"server", "router", "listener", "connections", "store", "dbfile", "notify", "status",
             "curve", "activation", "cli", "recovery_store", "schema"}  # fmt: skip
FORBIDDEN_LIBS = {"zmq", "asyncio", "sqlite3", "aiosqlite"}
MUTATORS = {"pop", "clear", "update", "setdefault", "popitem", "__setitem__", "__delitem__",
            "add", "discard", "remove", "append"}  # fmt: skip


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
    return names


def _through_engine(node: ast.expr) -> bool:
    """Is ``node`` reached through something called ``engine`` (``self.engine.x``, ``engine.y``)?"""
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
        if isinstance(node, ast.Attribute) and node.attr == "engine":
            return True
    return isinstance(node, ast.Name) and node.id == "engine"


def _writes_into_engine(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in MUTATORS
            and _through_engine(node.func)
        ):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        for target in targets:
            if isinstance(target, ast.Attribute | ast.Subscript) and _through_engine(target):
                found.append(f"line {target.lineno}: {ast.unparse(target)} = ...")
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ("wall", "monotonic", "clock")
            and _through_engine(node)
        ):
            found.append(f"line {node.lineno}: {ast.unparse(node)} (time reaches it as parameters)")
    return found


def test_the_engine_imports_nothing_of_the_daemon_around_it() -> None:
    for name in PURE:
        imported = _imports(ast.parse((PACKAGE / name).read_text()))
        own = {m.split(".")[1] for m in imported if m.startswith("positiond.")}
        assert not own & DAEMON_IO, f"{name} imports {sorted(own & DAEMON_IO)}"
        libs = {m.split(".")[0] for m in imported}
        assert not libs & FORBIDDEN_LIBS, f"{name} imports {sorted(libs & FORBIDDEN_LIBS)}"


def test_nothing_outside_the_engine_writes_into_it() -> None:
    problems = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in PURE:
            continue
        found = _writes_into_engine(path.read_text())
        if found:
            problems[str(path.relative_to(PACKAGE))] = found
    assert problems == {}


def test_the_check_sees_the_writes_the_daemon_used_to_make() -> None:
    """What server.py did before the split is caught (so the check above can fail)."""
    before = """
self.engine.health = self.health
self.engine.liveness.timeout = self.config.heartbeat_timeout
self.engine.flush_interval = 2.0
self.engine.peers.pop(rid, None)
engine.counters["x"] += 1
now, wall = self.monotonic(), engine.wall()
"""
    assert len(_writes_into_engine(before)) == 6


def test_each_component_owns_its_counters_and_health_merges_them(tmp_path: Path) -> None:
    config = Config(db=tmp_path / "p.db", endpoint=f"ipc://{tmp_path}/p.sock")
    daemon = Daemon(config)
    engine, router, listener = daemon.engine, daemon.router, daemon.listener
    assert not hasattr(engine, "health")
    dicts = [engine.counters, router.counters, listener.counters, daemon.counters,
             daemon.watchers.counters]  # fmt: skip
    assert len({id(d) for d in dicts}) == 5
    assert not set(engine.counters) & set(router.counters) & set(listener.counters)
    engine.counters["messages"] += 3
    router.counters["bad_messages"] += 2
    listener.counters["refused_connections"] += 1
    counters = daemon.health()["counters"]
    assert (counters["messages"], counters["bad_messages"], counters["refused_connections"]) == (
        3, 2, 1,
    )  # fmt: skip
    assert set(counters) == set().union(*dicts)


def test_settings_reach_the_engine_through_its_methods() -> None:
    engine = Engine(3.0, 1.0)
    engine.set_heartbeat_timeout(7.5)
    engine.set_flush_interval(0.25)
    assert engine.liveness.timeout == 7.5 and engine.flush_interval == 0.25


# The engine's time parameters and how many positional arguments carry them (rid/msg first).
TIMED = {"tick": (2, ()), "peer_gone": (2, ()), "load": (4, ()), "receive": (4, ()),
         "take_batch": (1, ("wall",))}  # fmt: skip


def _engine_call(node: ast.AST) -> str | None:
    """The engine method a call makes (``self.engine.tick(...)``, the router's bound
    ``receive(...)``), or None."""
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr in TIMED and _through_engine(func):
        return func.attr
    if isinstance(func, ast.Name) and func.id == "receive":  # bound once per drain
        return "receive"
    return None


def test_the_daemon_hands_the_engine_its_time() -> None:
    """The engine's own clocks are defaults for tests and benchmarks only: every call the daemon
    makes passes the time, so the daemon alone decides what "now" is."""
    calls = []
    for name in ("server.py", "router.py"):
        for node in ast.walk(ast.parse((PACKAGE / name).read_text())):
            attr = _engine_call(node)
            if attr is None:
                continue
            assert isinstance(node, ast.Call)
            positional, keywords = TIMED[attr]
            given = {k.arg for k in node.keywords}
            ok = len(node.args) >= positional and set(keywords) <= given
            calls.append((name, node.lineno, attr, ok))
    assert {attr for _, _, attr, _ in calls} == set(TIMED)  # the walk sees every one of them
    assert [c for c in calls if not c[3]] == []
