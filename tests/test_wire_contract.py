"""docs/PROTOCOL.md is executable: its §9 exchanges are replayed against a real daemon, and its
§6 error codes are exactly the codes the daemon can send, each provoked by a test.

§9's convention (explained at the top of §9 for readers too):

- ``→ TEXT``  the current connection sends TEXT as one frame, byte for byte (so invalid JSON can
  be shown); a JSON array is sent as several frames, one per element (a string as its bytes, an
  object as JSON).
- ``← JSON``  the next message the daemon sends on the current connection (``ping``s and a
  watcher's ``health`` frames skipped),
  compared with JSON exactly: same keys, same values, same JSON types. Inside a string,
  ``<name>`` matches any text and captures it; a name seen before must match the same text again,
  and in a ``→`` line it is replaced by what it captured.
- ``(connection NAME)``  what follows runs on connection NAME, a raw DEALER opened on first use
  (the first is ``A``). ``(close NAME)``: that connection's socket is closed.
- ``(wait until TABLE KEY col=value ...)``  the test waits (with a deadline) until the database
  row shows these values; ``(stored: TABLE KEY col=value ...)`` checks them now. TABLE is
  ``session`` (strategy_sessions by session_key) or ``leg`` (strategy_positions by
  position_key); each value is a JSON literal.
- ``(the daemon restarts)``  SIGTERM, then the same daemon again on the same database and socket.
- Any other ``(...)`` line (and its indented continuation lines) is prose for the reader.

All blocks run in order against one daemon on a fresh database, so ids are literal.
"""

from __future__ import annotations

import ast
import re
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from positiond.engine import health_reply
from positiond.protect.handback import HandBack
from positiond.router import PING as SERVER_PING
from positiond_client.channel import FINAL_SESSION_ERRORS
from positiond_client.errors import ProtocolError
from positiond_client.protocol import (
    CLIENT_ONLY_CODES,
    REPLY_TYPES,
    SESSION_FINAL_CODES,
    ErrorCode,
    ack_reply,
    decode_reply,
    encode,
    error_reply,
    notice_reply,
    ping_reply,
)
from tests.helpers import UNIT, DaemonProcess, rows, wait_for
from tests.inprocess import InProcessDaemon, RawClient, insert_protective_order
from tests.test_handback import crash_a_leg

ROOT = Path(__file__).parent.parent
PROTOCOL = ROOT / "docs" / "PROTOCOL.md"
PLACEHOLDER = re.compile(r"<([a-z][a-z0-9_]*)>")
ACTION = re.compile(
    r"\((?:connection (?P<conn>\w+)|close (?P<close>\w+)|(?P<restart>the daemon restarts)"
    r"|(?P<how>wait until|stored:) (?P<table>session|leg) (?P<key>\S+) (?P<cols>.+))\)"
)
ACTION_WORDS = ("(connection", "(close", "(wait", "(stored", "(the daemon")
COLUMN = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')

# Which test provokes each code the daemon can send (from a real daemon, over real sockets).
# "§9" = the exchanges replayed by test_protocol_examples_replay_against_a_real_daemon.
PROVOKED_BY: dict[str, str] = {
    "BAD_MESSAGE": "§9",
    "BAD_VERSION": "§9",
    "BAD_TYPE": "§9",
    "BAD_FIELD": "§9",
    "BAD_FRAMES": "§9",
    "BAD_TOKEN": "§9",
    "NO_SESSION": "§9",
    "UNKNOWN_SESSION": "§9",
    "SESSION_CLOSED": "§9",
    "UNKNOWN_LEG": "§9",
    "KEY_CONFLICT": "§9",
    "FENCED": "§9",
    "BAD_STATE": "§9",
    "UNKNOWN_ORPHAN": "§9",
    "LEG_CLOSED": "test_leg_closed_for_a_leg_its_protective_stop_closed",
    "NOT_WATCHING": "§9",
    "BUSY": "test_busy_for_a_connection_beyond_the_limit",
    "INTERNAL": "test_internal_when_the_database_refuses_one_operation",
}


# ---- parsing the document ------------------------------------------------------------------


def example_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(section number, lines) of every ```text block under a ``### 9.x`` heading; each such
    section must hold at least one (a block the parser misses would silently not run)."""
    part = text[text.index("\n## 9. ") :]
    blocks = []
    for section in re.split(r"\n(?=### 9\.)", part)[1:]:
        number = section[4 : section.index(" ", 4)]
        found = re.findall(r"^```text\n(.*?)\n```$", section, re.S | re.M)
        assert found, f"§{number} has no ```text block"
        blocks += [(number, body.splitlines()) for body in found]
    return blocks


def documented_codes(text: str) -> set[str]:
    """The codes in the first table of §6 (the codes on the wire)."""
    part = text[text.index("\n## 6. ") :]
    part = part[: part.index("\n## 7. ")]
    table = part[part.index("\n|") : part.index("\n\n", part.index("\n|"))]
    return set(re.findall(r"^\| `([A-Z_]+)` \|", table, re.M))


def client_only_codes(text: str) -> set[str]:
    """The codes §6.1 lists as raised by the client library only."""
    part = text[text.index("\n### 6.1 ") :]
    part = part[: part.index("\n## 7. ")]
    return set(re.findall(r"^\| `([A-Z_]+)` \|", part, re.M))


def codes_in_daemon_source() -> set[str]:
    """Every code literal passed to an error builder in the daemon (and the protocol module it
    decodes with): so a code added to the code but not to ErrorCode is caught."""
    builders = {"error", "_error", "error_reply", "ProtocolError", "Refusal"}
    files = [*sorted((ROOT / "daemon" / "positiond").rglob("*.py"))]
    files.append(ROOT / "client" / "positiond_client" / "protocol.py")
    found: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            value = node.value if isinstance(node, ast.Attribute) else None
            if isinstance(value, ast.Name) and value.id == "ErrorCode":
                assert isinstance(node, ast.Attribute)
                found.add(node.attr)
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in builders:
                continue
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                for sub in ast.walk(arg):
                    literal = sub.value if isinstance(sub, ast.Constant) else None
                    if isinstance(literal, str) and re.fullmatch(r"[A-Z][A-Z_]{2,}", literal):
                        found.add(literal)
    return found


# ---- matching ------------------------------------------------------------------------------


def _match_text(expected: str, actual: str, captured: dict[str, str], where: str) -> None:
    names = PLACEHOLDER.findall(expected)
    if not names:
        assert actual == expected, where
        return
    pattern = ""
    last = 0
    for m in PLACEHOLDER.finditer(expected):
        pattern += re.escape(expected[last : m.start()]) + f"(?P<{m[1]}>.+?)"
        last = m.end()
    pattern += re.escape(expected[last:])
    found = re.fullmatch(pattern, actual, re.S)
    assert found is not None, f"{where}: {actual!r} does not match {expected!r}"
    for name in names:
        value = found[name]
        assert captured.setdefault(name, value) == value, f"{where}: <{name}> changed"


def match(expected: Any, actual: Any, captured: dict[str, str], where: str) -> None:
    """Exact comparison (JSON types included), with ``<name>`` placeholders inside strings."""
    assert type(actual) is type(expected), f"{where}: {actual!r} is not like {expected!r}"
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for name, value in expected.items():
            match(value, actual[name], captured, f"{where}.{name}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            match(e, a, captured, f"{where}[{i}]")
    elif isinstance(expected, str):
        _match_text(expected, actual, captured, where)
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def test_the_matcher_is_exact() -> None:
    got: dict[str, str] = {}
    match({"a": 1, "t": "x <n> y"}, {"a": 1, "t": "x 42 y"}, got, "m")
    assert got == {"n": "42"}
    for expected, actual in [
        ({"a": 1}, {"a": 1.0}),  # an integer is not a float
        ({"a": 1}, {"a": 1, "b": 2}),  # no extra key
        ({"t": "x <n> y"}, {"t": "x 43 y"}),  # a capture matches the same text again
        ({"t": "<m>z"}, {"t": "zz!"}),
        ([1, 2], [1]),
    ]:
        with pytest.raises(AssertionError):
            match(expected, actual, dict(got), "m")


# ---- replaying -----------------------------------------------------------------------------


class Replay:
    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.ctx = zmq.Context()
        self.conns: dict[str, zmq.Socket[bytes]] = {}
        self.current = "A"
        self.captured: dict[str, str] = {}
        self.codes: set[str] = set()

    def sock(self) -> zmq.Socket[bytes]:
        if self.current not in self.conns:
            sock = self.ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(self.daemon.endpoint)
            self.conns[self.current] = sock
        return self.conns[self.current]

    def close(self) -> None:
        for sock in self.conns.values():
            sock.close(0)
        self.ctx.term()

    def substitute(self, text: str) -> str:
        def value(m: re.Match[str]) -> str:
            assert m[1] in self.captured, f"<{m[1]}> used before it was captured"
            return self.captured[m[1]]

        return PLACEHOLDER.sub(value, text)

    def send(self, text: str) -> None:
        text = self.substitute(text)
        frames: list[bytes]
        if text.startswith("["):
            parts = orjson.loads(text)
            frames = [p.encode() if isinstance(p, str) else encode(p) for p in parts]
        else:
            frames = [text.encode()]
        self.sock().send_multipart(frames)

    def receive(self, timeout: float = 5.0) -> dict[str, Any] | None:
        sock = self.sock()
        while sock.poll(int(timeout * UNIT * 1000)):
            msg: dict[str, Any] = orjson.loads(sock.recv())
            # §5.3: a client ignores pings; §9.8: a watcher's health beats are left out
            if msg.get("type") not in ("ping", "health"):
                return msg
        return None

    def nothing_pending(self, where: str) -> None:
        for name, sock in self.conns.items():
            while sock.poll(0):
                msg = orjson.loads(sock.recv())
                kind = msg.get("type")
                assert kind in ("ping", "health"), f"{where}: unexpected on {name}: {msg}"

    def row(self, table: str, key: str) -> sqlite3.Row | None:
        sql = {
            "session": "SELECT * FROM strategy_sessions WHERE session_key = ?",
            "leg": "SELECT * FROM strategy_positions WHERE position_key = ?",
        }[table]
        found = rows(self.daemon.db, sql, (key,)) if self.daemon.db.exists() else []
        return found[0] if found else None

    def shows(self, table: str, key: str, cols: str) -> bool:
        row = self.row(table, key)
        if row is None:
            return False
        return all(row[name] == orjson.loads(value) for name, value in COLUMN.findall(cols))

    def action(self, m: re.Match[str], where: str) -> None:
        if m["conn"]:
            self.current = m["conn"]
        elif m["close"]:
            self.conns.pop(m["close"]).close(0)
        elif m["restart"]:
            self.daemon.stop()
            self.daemon.start()
        elif m["how"] == "wait until":
            wait_for(lambda: self.shows(m["table"], m["key"], m["cols"]), 15, where)
        else:
            row = self.row(m["table"], m["key"])
            assert self.shows(m["table"], m["key"], m["cols"]), (where, dict(row or {}))

    def run(self, section: str, lines: list[str]) -> None:
        for number, line in enumerate(lines, 1):
            where = f"§{section} line {number}: {line.strip()[:90]}"
            stripped = line.strip()
            if stripped.startswith("→ "):
                self.send(stripped[2:])
            elif stripped.startswith("← "):
                expected = orjson.loads(stripped[2:])
                if isinstance(expected, dict) and expected.get("heartbeat_timeout") == 3.0:
                    # The documented default; the test daemon's is scaled for slow machines.
                    expected["heartbeat_timeout"] = DOC_HEARTBEAT_TIMEOUT
                got = self.receive()
                assert got is not None, f"{where}: no answer"
                match(expected, got, self.captured, where)
                if got.get("type") == "error":
                    self.codes.add(got["code"])
            elif (m := ACTION.fullmatch(stripped)) is not None:
                self.action(m, where)
            else:
                assert not stripped.startswith(ACTION_WORDS), f"{where}: not an action"
                assert stripped.startswith("(") or line.startswith(" "), f"{where}: stray line"
        self.nothing_pending(f"end of §{section}")


DOC_HEARTBEAT_TIMEOUT = 3.0 * UNIT  # §9 shows the default, 3 s


@pytest.fixture
def doc_daemon(workdir: Path) -> Iterator[DaemonProcess]:
    # Default settings (§9 says so), except a heartbeat timeout scaled for a loaded machine.
    proc = DaemonProcess(workdir, heartbeat_timeout=DOC_HEARTBEAT_TIMEOUT).start()
    try:
        yield proc
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()


def test_protocol_examples_replay_against_a_real_daemon(doc_daemon: DaemonProcess) -> None:
    blocks = example_blocks(PROTOCOL.read_text())
    headings = re.findall(r"^### (9\.\d+) ", PROTOCOL.read_text(), re.M)
    assert [b[0] for b in blocks] == headings and len(headings) >= 7
    replay = Replay(doc_daemon)
    try:
        for section, lines in blocks:
            replay.run(section, lines)
    finally:
        replay.close()
    assert replay.codes == {c for c, test in PROVOKED_BY.items() if test == "§9"}


# ---- the error codes -----------------------------------------------------------------------


def test_documented_codes_are_exactly_the_codes_the_daemon_can_send() -> None:
    text = PROTOCOL.read_text()
    enum = {c.value for c in ErrorCode}
    assert documented_codes(text) == enum
    assert codes_in_daemon_source() == enum
    assert client_only_codes(text) == set(CLIENT_ONLY_CODES)
    assert not CLIENT_ONLY_CODES & enum
    assert set(PROVOKED_BY) == enum
    tests = set(re.findall(r"^def (test_\w+)", Path(__file__).read_text(), re.M))
    assert {t for t in PROVOKED_BY.values() if t != "§9"} <= tests


def test_the_source_walk_finds_codes() -> None:
    # The walk must see the daemon's own literals, or the equality above proves nothing.
    found = codes_in_daemon_source()
    assert {"BAD_TOKEN", "FENCED", "BAD_STATE", "INTERNAL", "BAD_FRAMES", "NO_SESSION"} <= found


def test_internal_when_the_database_refuses_one_operation(daemon: DaemonProcess) -> None:
    """INTERNAL (C): the database refuses this one operation (here a trigger standing in for a
    constraint the daemon did not foresee); the batch's other operations still commit."""
    conn = sqlite3.connect(daemon.db)
    conn.execute(
        "CREATE TRIGGER refuse_boom BEFORE INSERT ON broker_orphans WHEN NEW.symbol = 'BOOM' "
        "BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
    )
    conn.commit()
    conn.close()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(daemon.endpoint)
    try:
        row = {"exchange": "NFO", "product": "MIS", "broker_quantity": 1, "known_quantity": 0}
        sock.send(
            encode({"v": 1, "type": "orphans", "seq": 1, "rows": [{**row, "symbol": "BOOM"}]})
        )
        sock.send(encode({"v": 1, "type": "orphans", "seq": 2, "rows": [{**row, "symbol": "OK"}]}))
        replies = []
        for _ in range(2):
            assert sock.poll(int(5 * UNIT * 1000)), "no answer"
            replies.append(orjson.loads(sock.recv()))
    finally:
        sock.close(0)
        ctx.term()
    assert replies[0]["code"] == "INTERNAL" and replies[0]["seq"] == 1, replies
    assert replies[0]["reason"].startswith("the database refused this message"), replies
    assert replies[1] == {"v": 1, "type": "ack", "seq": 2, "recorded": 1, "already_recorded": 0}
    stored = rows(daemon.db, "SELECT symbol FROM broker_orphans")
    assert [r["symbol"] for r in stored] == ["OK"]


def test_leg_closed_for_a_leg_its_protective_stop_closed(workdir: Path) -> None:
    """LEG_CLOSED: an ``update`` (I, no ``seq``) and an ``exit`` (C) for a leg whose protective
    stop order filled at the broker. Only the protect worker's report closes a leg that way, so
    the daemon runs in this process and gets that report as the worker gives it (§5.4)."""
    daemon = InProcessDaemon(workdir)
    try:
        crash_a_leg(daemon)
        protect_id = insert_protective_order(daemon.db, "leg-1")
        raw = RawClient(daemon.endpoint)
        token = "ab" * 16
        try:
            sid = raw.ask({"type": "start", "session": "n", "token": token, "seq": 1,
                           "strategy": "s"})["session_id"]  # fmt: skip
            raw.ask({"type": "resolve", "session": "n", "token": token, "seq": 2,
                     "key": "leg-1", "action": "adopt"})  # fmt: skip
            daemon.handback(HandBack("leg-1", sid, "triggered", protect_id, "OA-1001", 9.5, 9.4))
            assert raw.recv()["code"] == "LEG_CLOSED"  # the notice
            raw.send({"type": "update", "session": "n", "token": token, "key": "leg-1",
                      "stop_price": 9.0})  # fmt: skip
            update = raw.recv()
            exit_ = raw.ask({"type": "exit", "session": "n", "token": token, "seq": 3,
                             "key": "leg-1", "exit_reason": "STOP_HIT"})  # fmt: skip
        finally:
            raw.close()
    finally:
        daemon.stop()
    assert (update["type"], update["code"], update["key"], "seq" in update) == (
        "error", "LEG_CLOSED", "leg-1", False,
    )  # fmt: skip
    assert (exit_["type"], exit_["code"], exit_["key"], exit_["seq"]) == (
        "error", "LEG_CLOSED", "leg-1", 3,
    )  # fmt: skip


def test_busy_for_a_connection_beyond_the_limit(workdir: Path) -> None:
    """BUSY (I, no ``seq``): with ``--max-connections 1``, two connections queued in the
    listener's backlog while the daemon was stopped are both accepted when it resumes; the one
    beyond the limit is answered BUSY (and dropped), the other is served."""
    daemon = DaemonProcess(workdir, "--max-connections", "1", heartbeat_timeout=5.0 * UNIT)
    daemon.start()
    assert daemon.proc is not None
    ctx = zmq.Context()
    socks, monitors = [], []
    try:
        daemon.proc.send_signal(signal.SIGSTOP)
        for _ in range(2):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            monitors.append(sock.get_monitor_socket(zmq.EVENT_CONNECTED))
            sock.connect(daemon.endpoint)
            socks.append(sock)
        for monitor in monitors:  # in the kernel's backlog: connected, not yet accepted
            assert monitor.poll(int(10 * UNIT * 1000)), "no connection"
            assert recv_monitor_message(monitor)["event"] == zmq.EVENT_CONNECTED
        daemon.proc.send_signal(signal.SIGCONT)
        answers = []
        for seq, sock in enumerate(socks, 1):
            sock.send(encode({"v": 1, "type": "query", "seq": seq, "what": "health"}))
            assert sock.poll(int(10 * UNIT * 1000)), "no answer"
            answers.append(orjson.loads(sock.recv()))
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGCONT)
        for sock in socks:
            sock.disable_monitor()
            sock.close(0)
        for monitor in monitors:
            monitor.close(0)
        ctx.term()
        daemon.stop()
    kinds = sorted((a["type"], a.get("code")) for a in answers)
    assert kinds == [("ack", None), ("error", "BUSY")], answers
    busy = next(a for a in answers if a["type"] == "error")
    assert "seq" not in busy and busy["reason"]


def test_a_session_from_before_tokens_takes_the_token_of_its_next_start(workdir: Path) -> None:
    """§2.4: a session stored without a token hash (schema < 3) accepts any token; its next
    start stores the hash of the token it carries, and from then on that token is required
    (also after a restart). It used to store the hash of "" and ack ``"token": ""``."""
    daemon = DaemonProcess(workdir, heartbeat_timeout=5.0 * UNIT).start()
    token = "ab" * 16
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(daemon.endpoint)  # kept open across restarts: no DISCONNECT verdict

    def ask(msg: dict[str, Any]) -> dict[str, Any]:
        sock.send(encode({"v": 1, "session": "old", **msg}))
        assert sock.poll(int(10 * UNIT * 1000)), f"no answer to {msg}"
        reply: dict[str, Any] = orjson.loads(sock.recv())
        return reply

    try:
        assert ask({"type": "start", "seq": 1, "strategy": "s"})["type"] == "ack"
        daemon.stop()
        conn = sqlite3.connect(daemon.db)
        conn.execute("UPDATE strategy_sessions SET token_hash = NULL")  # as before tokens
        conn.commit()
        conn.close()
        daemon.start()
        ack = ask({"type": "start", "seq": 2, "strategy": "s", "token": token})
        assert ack["type"] == "ack" and ack["token"] == token, ack
        daemon.stop()
        daemon.start()
        assert ask({"type": "sync", "seq": 3})["code"] == "BAD_TOKEN"
        assert ask({"type": "sync", "seq": 4, "token": token}) == {"v": 1, "type": "ack", "seq": 4}
    finally:
        sock.close(0)
        ctx.term()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()


# ---- the reply builders and parser of protocol.py ------------------------------------------


def test_every_reply_in_the_document_parses_with_decode_reply() -> None:
    replies = [
        line.strip()[2:]
        for _, lines in example_blocks(PROTOCOL.read_text())
        for line in lines
        if line.strip().startswith("← ")
    ]
    assert len(replies) > 40
    for text in replies:
        assert decode_reply(text.encode()) == orjson.loads(text)
    for kind in ("ack", "error", "ping", "notice"):
        assert kind in REPLY_TYPES
    # a type the client does not know is passed on (to be ignored), not refused
    assert decode_reply(b'{"v":1,"type":"later"}') == {"v": 1, "type": "later"}


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"[1]",
        b'{"type":"ack","seq":1}',
        b'{"v":1.0,"type":"ack","seq":1}',
        b'{"v":2,"type":"ack","seq":1}',
        b'{"v":1,"type":"ack"}',
        b'{"v":1,"type":"ack","seq":"1"}',
        b'{"v":1,"type":"error","reason":"r"}',
        b'{"v":1,"type":"error","code":"X"}',
        b'{"v":1,"type":"error","code":"X","reason":"r","seq":1.5}',
        b'{"v":1,"type":"error","code":"X","reason":"r","key":7}',
        b'{"v":1,"type":"notice"}',
        b'{"v":1}',
    ],
)
def test_decode_reply_refuses_what_a_client_cannot_rely_on(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_reply(raw)


def test_the_builders_write_what_the_daemon_sends() -> None:
    assert ack_reply(3, {"position_id": 1}) == b'{"v":1,"type":"ack","seq":3,"position_id":1}'
    assert ack_reply(3) == b'{"v":1,"type":"ack","seq":3}'
    # The daemon builds its acks with these very functions (engine and router import them).
    assert health_reply(3, {"a": 1}) == ack_reply(3, {"health": {"a": 1}})
    assert ping_reply() == SERVER_PING == b'{"v":1,"type":"ping"}'
    assert error_reply("FENCED", "r", 2, "k") == (
        b'{"v":1,"type":"error","code":"FENCED","reason":"r","seq":2,"key":"k"}'
    )
    notice = notice_reply("REVIVED", {"legs": ["a"]})
    assert decode_reply(notice) == {"v": 1, "type": "notice", "code": "REVIVED", "legs": ["a"]}
    assert all(code.value == code.name for code in ErrorCode)


def test_the_final_codes_are_those_of_the_document_and_the_reference_client() -> None:
    text = PROTOCOL.read_text()
    step = text[text.index("2. **Wait for its ack**") : text.index("3. **Resend the outbox**")]
    step = step[: step.index("means the session is over")]
    assert set(re.findall(r"`([A-Z_]+)`", step)) == set(SESSION_FINAL_CODES)
    assert set(SESSION_FINAL_CODES) == set(FINAL_SESSION_ERRORS)
