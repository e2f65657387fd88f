"""expiry_blast: a two-leg (CE + PE) option strategy that survives its own crash through positiond.

It buys the ATM call and put and gives each leg a LegMonitor: a stop that trails by levels, an
exit when the stop is hit. Prices come from a seeded random walk; orders go to a simulated broker
that keeps its book in a JSON file (positions outlive the strategy, as at a real broker) and
answers ``positionbook()`` in OpenAlgo's format. Run it twice::

    python examples/expiry_blast.py --crash-after 55   # SIGKILLs itself with both legs open
    python examples/expiry_blast.py --crash-after 55   # finds, verifies and resumes them

With ``--protect`` the session asks positiond for protective stop orders at the broker while it
is dead (only where the daemon's ``[protect]`` allows: docs/PROTECT.md); the next run is handed
them back, waits for positiond to cancel them before it exits a leg itself, and stops managing a
leg whose protective stop filled.

Only the public ``positiond_client`` API is used; docs/INTEGRATION.md walks through a crash day.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from positiond_client import RESUME, Leg, LegError, PositionPersistenceManager, UnavailableError

STRATEGY = "expiry_blast"
UNDERLYING, EXPIRY, ATM, LOT = "NIFTY", "28NOV25", 24000, 75
EXCHANGE, PRODUCT = "NFO", "MIS"
STOP_POINTS = 20.0  # initial stop: entry - 20
TRAIL_STEP = 10.0  # each +10 of the highest price over entry is one level: the stop moves up 10


def tick_round(price: float) -> float:
    """NSE options trade in steps of 0.05."""
    return round(max(0.05, round(price * 20) / 20), 2)


class Feed:
    """NIFTY as a seeded random walk; each option moves by half of it, plus its own noise.

    ``price(leg_type, tick)`` depends only on (seed, tick): after a restart the strategy sees
    the market its crashed predecessor would have seen.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.spot = [float(ATM)]

    def price(self, leg_type: str, tick: int) -> float:
        while len(self.spot) <= tick:
            step = random.Random(f"{self.seed}:spot:{len(self.spot)}").gauss(0, 6)
            self.spot.append(self.spot[-1] + step)
        move = 0.5 * (self.spot[tick] - ATM) * (1 if leg_type == "CE" else -1)
        noise = random.Random(f"{self.seed}:{leg_type}:{tick}").gauss(0, 0.8)
        return tick_round(100.0 + move + noise)


class SimBroker:
    """A tiny broker, with the exchange's clock, whose book lives in ``state_dir/broker.json``."""

    def __init__(self, state_dir: Path, feed: Feed) -> None:
        self.path = state_dir / "broker.json"
        self.feed = feed
        self.book: dict[str, Any] = {"tick": 0, "orders": 0, "positions": {}}
        state_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.book = json.loads(self.path.read_text())

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.book, indent=1))
        os.replace(tmp, self.path)  # atomic: a crash never leaves half a book

    @property
    def tick(self) -> int:
        return int(self.book["tick"])

    def advance(self) -> int:
        """One tick of the market clock (the market's, not the strategy's: it is saved)."""
        self.book["tick"] += 1
        self._save()
        return self.tick

    def new_day(self) -> None:
        """Clock back to the open; closed rows dropped (a positionbook lists today's only)."""
        self.book["tick"] = 0
        self.book["positions"] = {s: r for s, r in self.book["positions"].items() if r["quantity"]}
        self._save()

    def ltp(self, symbol: str) -> float:
        return self.feed.price(symbol[-2:], self.tick)

    def placeorder(self, *, symbol: str, action: str, quantity: int) -> dict[str, Any]:
        """A market order, filled at the last price. OpenAlgo answers ``{status, orderid}``; the
        fill price is added here (a real strategy reads it from ``orderstatus``)."""
        fill = self.ltp(symbol)
        new = {"exchange": EXCHANGE, "product": PRODUCT, "quantity": 0, "cash": 0.0}
        row = self.book["positions"].setdefault(symbol, new)
        signed = quantity if action == "BUY" else -quantity
        row["quantity"] += signed
        row["cash"] = round(row["cash"] - signed * fill, 2)
        if action == "BUY":
            row["average_price"] = fill
        self.book["orders"] += 1
        self._save()
        orderid = f"2511280000{self.book['orders']:05d}"
        return {"status": "success", "orderid": orderid, "average_price": fill}

    def positionbook(self) -> dict[str, Any]:
        """As OpenAlgo answers it: strings, signed quantity, closed rows kept with "0"."""
        data = []
        for symbol, row in sorted(self.book["positions"].items()):
            ltp = self.ltp(symbol)
            data.append(
                {
                    "symbol": symbol,
                    "exchange": row["exchange"],
                    "product": row["product"],
                    "quantity": str(row["quantity"]),
                    "average_price": f"{row['average_price']:.2f}",
                    "ltp": f"{ltp:.2f}",
                    "pnl": f"{row['cash'] + row['quantity'] * ltp:.2f}",
                }
            )
        return {"status": "success", "data": data}


# What the transcript says, per event; ``--json`` prints the same fields as one object a line.
TEXT = {
    "start": "{strategy}: seed {seed}, market at tick {tick} of {ticks}\n"
    "  broker book {book}, positiond at {endpoint}",
    "session": "session {session_id} started; crashed legs found: {crashed}",
    "found": "found {leg} {key} of session {session_id} ({crash_reason})\n"
    "  saved: entry {entry:.2f}, stop {stop:.2f}, level {level:g}, highest {highest:.2f}\n"
    "  verdict {verdict}: {reason} -> {action}",
    "resume": "  resumed {leg} from tick {tick}: stop {stop:.2f}, level {level}, "
    "highest {highest:.2f}",
    "orphan": "broker position nobody explains: {symbol} quantity {quantity}",
    "held": "{leg} {key} is {status} in session {session_id}: not entering again",
    "day": "nothing to resume: a new trading day",
    "entry": "tick {tick:3d}  {leg} entered {symbol} x{quantity} @ {price:.2f}, stop {stop:.2f}",
    "trail": "tick {tick:3d}  {leg} trail level {level}: stop {old_stop:.2f} -> {stop:.2f} "
    "(highest {highest:.2f})",
    "exit": "tick {tick:3d}  {leg} {reason}: sold x{quantity} @ {price:.2f} (stop {stop:.2f}, "
    "P&L {pnl:+.2f})",
    "crash": "tick {tick:3d}  CRASH (SIGKILL) with {count} leg(s) open; {summary}",
    "end": "session {session_id} completed at tick {tick}\n  broker: {summary}",
    "error": "not trading: {error}",
    "protected": "  {leg} {key}: protective stop {order_id} ({state}) at the broker, trigger "
    "{trigger}: {what}",
    "notice": "positiond: {code} {key} {text}",
    "stopped": "tick {tick:3d}  {leg} closed at the broker by its protective stop: not managed",
    "hold": "tick {tick:3d}  {leg} stop hit, but positiond is still cancelling its protective "
    "stop: no exit until it is released",
}


class Transcript:
    """What happened, for people (text) or for programs (``--json``)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def say(self, event: str, **data: Any) -> None:
        line = json.dumps({"event": event, **data}) if self.as_json else TEXT[event].format(**data)
        print(line, flush=True)  # at once: a SIGKILL would lose a buffered line


class LegMonitor:
    """One leg: trailing stop by levels, exit on stop. Every tick's values go to positiond."""

    def __init__(
        self, pm: PositionPersistenceManager, broker: SimBroker, out: Transcript, leg: Leg
    ) -> None:
        self.pm, self.broker, self.out, self.leg = pm, broker, out, leg
        # Fresh or adopted after a crash, the handle carries everything the monitor needs.
        self.name = leg.leg_type or leg.symbol[-2:]
        self.entry = leg.entry_price
        self.stop = float(leg.stop_price or self.entry - STOP_POINTS)
        self.highest = float(leg.highest_price or self.entry)
        self.level = int(leg.last_trail_level or 0)
        self.state = dict(leg.state)
        self.open = True
        self.holding = False  # an exit waits for positiond to cancel its protective stop

    @classmethod
    def enter(
        cls, pm: PositionPersistenceManager, broker: SimBroker, out: Transcript, leg_type: str
    ) -> LegMonitor:
        symbol = f"{UNDERLYING}{EXPIRY}{ATM}{leg_type}"
        fill = broker.placeorder(symbol=symbol, action="BUY", quantity=LOT)["average_price"]
        stop = tick_round(fill - STOP_POINTS)
        leg = pm.save_position_entry(
            symbol=symbol,
            leg_type=leg_type,
            entry_price=fill,
            stop_price=stop,  # the strategy's own stop, not a hard-coded percentage
            quantity=LOT,
            exchange=EXCHANGE,
            product=PRODUCT,
            side="BUY",
            highest_price=fill,
            last_trail_level=0,
            state={"atm": ATM, "trail_step": TRAIL_STEP, "tick": broker.tick},
        )
        entered = {"symbol": symbol, "quantity": LOT, "price": fill, "stop": stop}
        out.say("entry", tick=broker.tick, leg=leg_type, key=leg.key, **entered)
        return cls(pm, broker, out, leg)

    def levels(self) -> dict[str, Any]:
        return {"leg": self.name, "stop": self.stop, "level": self.level, "highest": self.highest}

    def on_tick(self, tick: int) -> None:
        if not self.pm.is_open(self.leg):  # closed by its protective stop (LEG_CLOSED)
            self.open = False
            self.out.say("stopped", tick=tick, leg=self.name)
            return
        price = self.broker.ltp(self.leg.symbol)
        self.highest = max(self.highest, price)
        level = math.floor((self.highest - self.entry) / TRAIL_STEP)
        if level > self.level:  # the stop only moves up
            old_stop, self.level = self.stop, level
            self.stop = tick_round(self.entry - STOP_POINTS + level * TRAIL_STEP)
            self.out.say("trail", tick=tick, old_stop=old_stop, **self.levels())
        self.state = {**self.state, "tick": tick}
        try:
            self.pm.queue_position_update(  # never blocks: the client coalesces and sends
                self.leg,
                current_price=price,
                stop_price=self.stop,
                highest_price=self.highest,
                last_trail_level=self.level,
                state=self.state,
            )
        except LegError:  # its protective stop filled just now: the position is gone
            self.open = False
            self.out.say("stopped", tick=tick, leg=self.name)
            return
        if price <= self.stop:
            if self.leg.protection_pending:
                # A broker stop positiond placed while we were dead is still live: exiting now
                # could sell twice. Wait for PROTECTION_RELEASED (or LEG_CLOSED: it filled).
                if not self.holding:
                    self.out.say("hold", tick=tick, leg=self.name)
                self.holding = True
                return
            self.exit(tick, "STOP_HIT")

    def exit(self, tick: int, reason: str) -> None:
        order = self.broker.placeorder(symbol=self.leg.symbol, action="SELL", quantity=LOT)
        price = order["average_price"]
        self.pm.save_position_exit(self.leg, exit_price=price, exit_reason=reason)
        self.open = False
        pnl = round((price - self.entry) * LOT, 2)
        self.out.say(
            "exit", tick=tick, reason=reason, quantity=LOT, price=price, pnl=pnl, **self.levels()
        )


def recover(
    pm: PositionPersistenceManager, broker: SimBroker, out: Transcript, protect: bool
) -> tuple[list[LegMonitor], bool]:
    """Start the session, verify crashed legs with the broker, resume those still open there.

    Returns the resumed monitors, and whether a fresh entry is safe: not if any leg had crashed
    (the day's trade was taken) or another session holds legs of ours (another instance runs).
    """
    report = pm.start_session(
        recover=True, positionbook=broker, protect=True if protect else None
    )
    out.say("session", session_id=pm.session_id, crashed=len(report.verdicts))
    monitors = []
    for verdict in report.verdicts:
        saved = verdict.leg
        out.say(
            "found",
            leg=saved.leg_type,
            key=saved.position_key,
            session_id=saved.session_id,
            crash_reason=saved.crash_reason,
            entry=saved.entry_price,
            stop=saved.stop_price,
            level=saved.last_trail_level,
            highest=saved.highest_price,
            verdict=verdict.verdict,
            reason=verdict.reason,
            action=report.actions.get(saved.position_key, ""),
        )
        handle = report.adopted.get(saved.position_key)
        if verdict.verdict == RESUME and handle is not None:
            if handle.protection is not None:  # positiond protected it while we were dead
                out.say(
                    "protected", leg=saved.leg_type, key=handle.key,
                    order_id=handle.protection.order_id, state=handle.protection.state,
                    trigger=handle.protection.trigger_price,
                    what="positiond cancels it" if handle.protection_pending else "settled",
                )  # fmt: skip
            monitors.append(LegMonitor(pm, broker, out, handle))
            out.say("resume", tick=broker.tick + 1, key=handle.key, **monitors[-1].levels())
    for orphan in report.orphans:
        out.say("orphan", symbol=orphan.symbol, quantity=orphan.broker_quantity)
    held = [leg for leg in pm.get_open_positions(STRATEGY) if leg.session_id != pm.session_id]
    for leg in held:
        out.say("held", leg=leg.leg_type, key=leg.key, status=leg.status, session_id=leg.session_id)
    return monitors, not report.verdicts and not held


def die(pm: PositionPersistenceManager, out: Transcript, tick: int, legs: list[LegMonitor]) -> None:
    """A hard crash: SIGKILL, no handle_crash, no end_session, legs open at the broker.

    It first waits (``sync``) until the updates already sent are stored, so that the transcript
    is reproducible. A real crash may lose the updates of its last milliseconds: the next run
    then resumes from the values of a tick earlier.
    """
    pm.sync(timeout=5.0)
    levels = [m.levels() for m in legs if m.open]
    summary = "; ".join(
        "{leg} stop {stop:.2f}, level {level}, highest {highest:.2f}".format(**lv) for lv in levels
    )
    out.say("crash", tick=tick, count=len(levels), summary=summary, legs=levels)
    os.kill(os.getpid(), signal.SIGKILL)


def run(args: argparse.Namespace) -> int:
    out = Transcript(args.json)
    broker = SimBroker(args.state_dir, Feed(args.seed))
    # progress_deadline: a main loop that stops sending updates with legs open is STALLED.
    deadline = max(5.0, 20 * args.tick_interval)
    def on_notice(code: str, details: dict[str, Any]) -> None:  # on the client's I/O thread
        if code in ("PROTECTION_RELEASED", "PROTECTION_CANCEL_FAILED", "LEG_CLOSED"):
            text = details.get("outcome") or details.get("reason") or details.get("exit_price")
            out.say("notice", code=code, key=details.get("key"), text=text)

    pm = PositionPersistenceManager(
        STRATEGY, endpoint=args.endpoint, progress_deadline=deadline, on_notice=on_notice
    )
    where = {"book": str(broker.path), "endpoint": pm.endpoint}
    out.say("start", strategy=STRATEGY, seed=args.seed, tick=broker.tick, ticks=args.ticks, **where)
    try:
        monitors, may_enter = recover(pm, broker, out, args.protect)
    except (UnavailableError, ValueError) as exc:  # no answer, or a broker error: never guess
        out.say("error", error=str(exc))
        if pm.session_id is not None:
            pm.end_session()
        pm.close()
        return 2
    try:
        if may_enter:
            if broker.tick > 0:
                broker.new_day()
                out.say("day")
            broker.advance()
            monitors = [LegMonitor.enter(pm, broker, out, leg_type) for leg_type in ("CE", "PE")]
        while any(m.open for m in monitors) and broker.tick < args.ticks:
            time.sleep(args.tick_interval)
            tick = broker.advance()
            for monitor in monitors:
                if monitor.open:
                    monitor.on_tick(tick)
            if tick == args.crash_after:
                die(pm, out, tick, monitors)
        for monitor in monitors:
            if monitor.open and pm.is_open(monitor.leg):  # intraday (MIS): square off
                if monitor.leg.protection_pending:  # never two exits: positiond's stop is live
                    if not monitor.holding:
                        out.say("hold", tick=broker.tick, leg=monitor.name)
                    continue
                monitor.exit(broker.tick, "SQUARE_OFF")
    except BaseException as exc:  # the strategy's own crash: its legs stay for the next run
        pm.handle_crash(exc)
        raise
    pm.end_session()
    book = broker.positionbook()["data"]
    summary = ", ".join(f"{r['symbol']} quantity {r['quantity']} pnl {r['pnl']}" for r in book)
    out.say("end", session_id=pm.session_id, tick=broker.tick, summary=summary, positionbook=book)
    pm.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    state_dir = Path(tempfile.gettempdir()) / f"expiry_blast-{os.getuid()}"
    add("--endpoint", help="positiond's endpoint (default: POSITIOND_ENDPOINT, else its default)")
    add(
        "--state-dir",
        type=Path,
        default=state_dir,
        help=f"the broker's book (default: {state_dir})",
    )
    add("--ticks", type=int, default=200, help="length of the trading day (default: 200)")
    add("--tick-interval", type=float, default=0.01, help="seconds per tick (default: 0.01)")
    add("--seed", type=int, default=19, help="seed of the price feed (default: 19)")
    add("--crash-after", type=int, metavar="N", help="SIGKILL itself when the clock reaches tick N")
    add("--json", action="store_true", help="one JSON object per event instead of text")
    add(
        "--protect",
        action="store_true",
        help="ask positiond for protective stop orders at the broker while this strategy is "
        "dead (only where its [protect] config allows; docs/PROTECT.md)",
    )
    add("--positionbook", action="store_true", help="print the broker's positionbook and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.positionbook:  # what an operator saves for `posctl verify --positionbook FILE`
        print(json.dumps(SimBroker(args.state_dir, Feed(args.seed)).positionbook(), indent=1))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
