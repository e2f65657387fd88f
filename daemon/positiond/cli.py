"""``positiond`` command line: settings, logging, signals; runs the daemon until told to stop.

Exit codes: 0 after a graceful stop (SIGTERM/SIGINT), 1 when the daemon cannot run (another
instance holds the database or endpoint, a database from a newer version, a database it cannot
open), 2 for an invalid setting, an unusable socket from systemd or an ipc socket in a directory
other users can write — found before anything is opened or bound, 3 for a database file that is
damaged or not a database (restore the backup), or a stop after the daemon stopped writing for
good (its database deleted, replaced or damaged). The systemd unit restarts on neither 2 nor 3
(``RestartPreventExitStatus=2 3``): a restart cannot fix them. Each failure is one line in the
log, without a traceback. A metrics port (``metrics_listen``) already taken is exit 1 too; an
address it can never bind (not this host's, a sandbox without TCP) is 2.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from positiond.activation import ActivationError, Inherited, inherited_socket, matches
from positiond.config import Config, ConfigError, Loaded, format_config, load
from positiond.listener import UnsafeEndpoint
from positiond.logs import set_level, setup_logging
from positiond.metrics.listen import MetricsError
from positiond.server import AlreadyRunning, Daemon
from positiond.status import status_line
from positiond.store.dbfile import CorruptDatabase, StoreError
from positiond.store.schema import SchemaError

__all__ = ["async_main", "main"]

log = logging.getLogger("positiond")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_DATABASE = 0, 1, 2, 3


class _Reloader:
    """SIGHUP: re-read the config file (same flags, same environment), apply what is safe,
    and re-read the allowed CURVE client keys."""

    def __init__(self, daemon: Daemon, argv: Sequence[str] | None, env: Mapping[str, str]):
        self.daemon, self.argv, self.env = daemon, argv, dict(env)

    def __call__(self) -> None:
        daemon = self.daemon
        daemon.notifier.reloading()
        try:
            try:
                loaded = load(self.argv, self.env)
            except ConfigError as exc:
                log.error("reload: %s; keeping the current settings", exc)
                return
            old = daemon.config
            applied, refused = daemon.reconfigure(loaded.config)
            if "log_level" in applied:
                set_level(daemon.config.log_level)
            keys = daemon.reload_keys()
            if keys is not None:
                log.info("reload: %s", keys)
            if not applied and not refused and keys is None:
                log.info("reload: %s unchanged", loaded.file or "settings")
            for name in applied:
                log.info(
                    "reload: %s %s -> %s", name, getattr(old, name), getattr(daemon.config, name)
                )
            if refused:
                log.warning(
                    "reload: not applied (restart the daemon to change them): %s",
                    ", ".join(
                        f"{n} (running {getattr(old, n)}, configured {getattr(loaded.config, n)})"
                        for n in refused
                    ),
                )
        finally:
            daemon.notifier.ready(status_line(daemon.health()))


async def async_main(
    config: Config,
    *,
    inherited: Inherited | None = None,
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the exit code."""
    log.info("database: %s", config.db)
    log.info("endpoint: %s", config.endpoint)
    if inherited is not None:
        log.info("socket activation: listening socket %s from systemd", inherited.path)
    while True:
        daemon = Daemon(config, listen_fd=None if inherited is None else inherited.fd)
        loop = asyncio.get_running_loop()
        signalled: list[int] = []

        def stop(sig: int, daemon: Daemon = daemon, signalled: list[int] = signalled) -> None:
            signalled.append(sig)
            daemon.request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop, sig)
        loop.add_signal_handler(
            signal.SIGHUP, _Reloader(daemon, argv, os.environ if env is None else env)
        )
        try:
            await daemon.run()
        except CorruptDatabase as exc:
            log.error("%s", exc)
            return EXIT_DATABASE
        except (AlreadyRunning, SchemaError, StoreError, MetricsError) as exc:
            log.error("%s", exc)
            return EXIT_CONFIG if isinstance(exc, MetricsError) and exc.permanent else EXIT_FAILED
        except UnsafeEndpoint as exc:
            log.error("%s", exc)
            return EXIT_CONFIG
        if daemon.fenced is not None and not signalled:
            # PostgreSQL, several hosts: our lease was taken over. Start again as after a
            # restart: a new epoch, this host's sessions loaded, clients re-announcing.
            log.warning("restarting after being fenced: %s", daemon.fenced)
            config = daemon.config
            continue
        if daemon.storage_fault is not None:
            log.error("stopped after a storage fault: %s", daemon.storage_fault)
            return EXIT_DATABASE
        return EXIT_OK


def _settings(argv: Sequence[str] | None) -> tuple[Loaded, Inherited | None]:
    loaded = load(argv)
    if loaded.print_config:
        return loaded, None
    try:
        inherited = inherited_socket()
    except ActivationError as exc:
        raise ConfigError("socket activation", str(exc)) from None
    if inherited is not None and not matches(loaded.config.endpoint, inherited):
        raise ConfigError(
            "endpoint",
            f"{loaded.config.endpoint} is not the socket systemd passed ({inherited.path}); "
            "make ListenStream= in positiond.socket and the endpoint the same path "
            f"(from {loaded.sources['endpoint']})",
        )
    return loaded, inherited


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``positiond`` console script and ``python -m positiond``."""
    env = dict(os.environ)  # as started: SIGHUP resolves the settings against the same one
    try:
        loaded, inherited = _settings(argv)
    except ConfigError as exc:
        print(f"positiond: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if loaded.print_config:
        sys.stdout.write(format_config(loaded))
        return EXIT_OK
    setup_logging(loaded.config.log_level)
    if loaded.file is not None:
        log.info("settings from %s", loaded.file)
    return asyncio.run(async_main(loaded.config, inherited=inherited, argv=argv, env=env))


if __name__ == "__main__":
    sys.exit(main())
