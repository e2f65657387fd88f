"""Scenario ``alerts``: from a strategy's kill -9 to its ``crashed`` alert at a webhook.

A real daemon with one webhook sink (``[[alerts.sink]]``, :mod:`bench.alert_receiver` on
127.0.0.1). Measured from the SIGKILL of a strategy process (bench/strategy_proc.py) to the
arrival of the POST whose ``session_id`` is that strategy's session.

``restart`` runs: the receiver answers the first POST of each kill with 500, and the daemon is
SIGKILLed as soon as that POST arrives — the verdict and its outbox row are committed, the retry
(1 s later) is not yet sent. The daemon is started again on the same database; measured from the
strategy's kill to the POST answered 200, and each kill must show exactly one distinct alert id.
"""

from __future__ import annotations

import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench.alert_receiver import Receiver
from bench.common import BenchError, DaemonProcess, kill_process, poll_until, read_only_db
from bench.crash import _spawn
from bench.report import Scenario, at_least, at_most, stats

__all__ = ["run"]

DELIVER_DEADLINE = 15.0  # seconds, from the kill to the POST


def _config(workdir: Path, url: str) -> Path:
    path = workdir / "alerts.toml"
    path.write_text(
        f'[[alerts.sink]]\nname = "bench-hook"\ntype = "webhook"\nurl = "{url}"\ntimeout = 5\n'
    )
    return path


def _daemon(receiver: Receiver) -> DaemonProcess:
    daemon = DaemonProcess(log_level="INFO")
    daemon.args += ["--config", str(_config(daemon.workdir, receiver.url))]
    return daemon


def _posts_for(receiver: Receiver, sid: int) -> list[tuple[float, dict[str, Any]]]:
    with receiver.lock:
        return [
            (at, body)
            for at, body in zip(receiver.arrived, receiver.posts, strict=True)
            if body.get("event") == "crashed" and body.get("session_id") == sid
        ]


def _redelivered(receiver: Receiver, sid: int) -> list[tuple[float, dict[str, Any]]]:
    """The POSTs of session ``sid``'s alert once there are two (500, then 200), else []."""
    got = _posts_for(receiver, sid)
    return got if len(got) >= 2 else []


def _kill_runs(reps: int, sc: Scenario) -> list[float]:
    receiver = Receiver()
    latencies: list[float] = []
    missed = 0
    ids: dict[int, set[str]] = {}
    try:
        with _daemon(receiver) as daemon:
            for rep in range(reps):
                proc, sid = _spawn(daemon, rep)
                t0 = time.perf_counter()
                proc.send_signal(signal.SIGKILL)
                kill_process(proc, signal.SIGKILL)
                try:
                    got = poll_until(partial(_posts_for, receiver, sid), DELIVER_DEADLINE,
                                     f"the crashed alert of session {sid}")  # fmt: skip
                except BenchError:
                    missed += 1
                    continue
                latencies.append((got[0][0] - t0) * 1e3)
                ids[sid] = {body["id"] for _, body in got}
            sc.raw["kill_daemon_warnings"] = daemon.warnings()
    finally:
        receiver.close()
    duplicates = sum(1 for found in ids.values() if len(found) != 1)
    sc.raw.update(kill_ms=latencies, kill_missed=missed, kill_posts=len(receiver.posts))
    if missed:
        sc.notes.append(f"alerts: {missed}/{reps} kills without a webhook POST in time")
    if duplicates:
        sc.notes.append(f"alerts: {duplicates}/{reps} kills posted more than one alert id")
    return latencies


def _restart_runs(reps: int, sc: Scenario) -> tuple[list[float], int]:
    """Kill → delivered across a daemon SIGKILL + restart; returns latencies and exact-once
    kills (exactly one distinct id, delivered)."""
    receiver = Receiver()
    latencies: list[float] = []
    exact = missed = 0
    try:
        with _daemon(receiver) as daemon:
            for rep in range(reps):
                with receiver.lock:
                    receiver.statuses = [500]  # the first attempt of this kill fails
                proc, sid = _spawn(daemon, 2000 + rep)
                t0 = time.perf_counter()
                proc.send_signal(signal.SIGKILL)
                kill_process(proc, signal.SIGKILL)
                try:
                    poll_until(partial(_posts_for, receiver, sid), DELIVER_DEADLINE,
                               f"the first (failed) POST of session {sid}")  # fmt: skip
                    daemon.kill()  # verdict committed, retry pending: the daemon dies here
                    daemon.start()
                    got = poll_until(partial(_redelivered, receiver, sid), DELIVER_DEADLINE,
                                     f"the redelivery of session {sid}'s alert")  # fmt: skip
                except BenchError:
                    missed += 1
                    continue
                latencies.append((got[1][0] - t0) * 1e3)
                if len({body["id"] for _, body in got}) == 1:
                    exact += 1
            # No copy of any alert is pending to be sent again: each is recorded DELIVERED.
            conn = read_only_db(daemon.db)
            try:
                late = conn.execute(
                    "SELECT count(*) FROM alert_deliveries WHERE state != 'DELIVERED'"
                ).fetchone()[0]
                # 1: the SIGKILL came before the failed attempt was recorded; 2: after.
                sc.raw["restart_attempts_recorded"] = dict(
                    conn.execute(
                        "SELECT attempts, count(*) FROM alert_deliveries GROUP BY attempts"
                    ).fetchall()
                )
            finally:
                conn.close()
            sc.raw["restart_daemon_warnings"] = daemon.warnings()
    finally:
        receiver.close()
    sc.raw.update(restart_ms=latencies, restart_missed=missed, restart_exact_once=exact,
                  restart_not_delivered=late)  # fmt: skip
    if missed:
        sc.notes.append(f"alerts: {missed}/{reps} restart runs not redelivered in time")
    if exact != reps - missed or late:
        sc.notes.append(
            f"alerts: restart runs with one distinct id {exact}/{reps}, "
            f"deliveries not DELIVERED {late}"
        )
    return latencies, exact


def run(quick: bool) -> Scenario:
    reps = 2 if quick else 20
    sc = Scenario("alerts")
    kill = stats(_kill_runs(reps, sc))
    restart_ms, exact = _restart_runs(reps, sc)
    restart = stats(restart_ms)
    sc.row(f"kill -9 → webhook POST p50 (ms), runs={kill.n}/{reps}", kill.p50, "never")
    sc.row("kill -9 → webhook POST p99 (ms)", kill.p99, "never", target=at_most(1000, " ms"))
    sc.row("kill -9 → webhook POST max (ms)", kill.max, "never")
    sc.row(
        f"kill -9, 500, daemon SIGKILL + restart → delivered p50 (ms), runs={restart.n}/{reps}",
        restart.p50,
        "never",
    )
    sc.row("… same, p99 (ms)", restart.p99, "never")
    sc.row("… same, kills with exactly one alert id", float(exact), target=at_least(reps))
    sc.raw.update(reps=reps, kill_stats_ms=kill.as_dict(), restart_stats_ms=restart.as_dict())
    return sc
