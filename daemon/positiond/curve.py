"""CURVE for tcp:// endpoints: the daemon proves who it is, clients prove they are allowed.

On ipc:// the filesystem decides who may connect (socket and directory modes). A tcp:// port
is reachable by anyone on the network, so positiond binds one only with CURVE: the daemon's
secret certificate, and a directory of the public certificates of the clients it accepts
(ZAP, through ``zmq.auth``). Certificates are the files ``zmq.auth.create_certificates`` (or
``curve_keygen`` from libzmq) writes: ``NAME.key`` (public) and ``NAME.key_secret`` (both keys).

SIGHUP re-reads the clients' directory (:meth:`ServerCurve.reload`): a removed key is refused at
its next handshake, and the daemon drops the connections that key already has (ZAP only runs at
the handshake, so without that a revoked client would keep writing until it reconnects).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

__all__ = ["CurveError", "ServerCurve", "load_public", "load_secret", "secure_server"]

log = logging.getLogger(__name__)


class CurveError(ValueError):
    """A certificate is missing or unusable."""


def load_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` certificate file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveError(f"cannot read the CURVE certificate {path}: {exc}") from None
    if secret is None:
        raise CurveError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def load_public(path: Path) -> bytes:
    """The public key from a ``.key`` (or ``.key_secret``) certificate file."""
    try:
        public: bytes = zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as exc:
        raise CurveError(f"cannot read the CURVE certificate {path}: {exc}") from None
    return public


class _Admitted:
    """ZAP's credentials provider: the public keys found in ``curve_clients`` (at start, and
    again at each reload).

    A refused key is logged at WARNING, once per key (a refused client keeps reconnecting),
    so an operator sees which host knocks with a key the daemon does not admit.
    """

    MAX_REMEMBERED = 1000

    def __init__(self, clients_dir: Path) -> None:
        self.clients_dir = clients_dir
        self.keys: frozenset[bytes] = frozenset()  # z85 public keys
        self._refused: set[bytes] = set()
        self.load()

    def load(self) -> None:
        self.keys = frozenset(zmq.auth.load_certificates(self.clients_dir))
        self._refused.clear()  # a key refused before may be admitted now, and refused again

    def text_keys(self) -> frozenset[str]:
        return frozenset(k.decode() for k in self.keys)

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        if key not in self._refused and len(self._refused) < self.MAX_REMEMBERED:
            self._refused.add(key)
            log.warning(
                "CURVE: refused a client whose public key %s is not in %s",
                key.decode(errors="replace"), self.clients_dir,
            )  # fmt: skip
        return False


class ServerCurve:
    """The daemon side: a ZAP authenticator that admits only the listed client keys."""

    def __init__(self, server_secret: Path, clients_dir: Path) -> None:
        self.public, self.secret = load_secret(server_secret)
        if not clients_dir.is_dir() or not any(clients_dir.glob("*.key")):
            raise CurveError(f"{clients_dir} holds no client public certificate (*.key)")
        self.clients_dir = clients_dir
        self._auth: AsyncioAuthenticator | None = None
        self._admitted: _Admitted | None = None
        self.keys: frozenset[str] = frozenset()  # z85 public keys admitted now

    def start(self, ctx: zmq.asyncio.Context) -> None:
        """Run the authenticator on ``ctx`` (before any socket of it binds)."""
        auth = AsyncioAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))
        auth.start()
        self._auth = auth
        self._admitted = _Admitted(self.clients_dir)
        auth.configure_curve_callback(domain="*", credentials_provider=self._admitted)
        self.keys = self._admitted.text_keys()
        log.info("CURVE on: %d allowed client key(s) from %s", len(self.keys), self.clients_dir)

    def reload(self) -> tuple[frozenset[str], frozenset[str]]:
        """Re-read the clients' directory; (added, removed) keys. Keeps the old set on error."""
        if self._auth is None or self._admitted is None:
            return frozenset(), frozenset()
        old = self.keys
        if not self.clients_dir.is_dir():
            log.error(
                "reload: %s is gone; keeping the %d key(s) loaded", self.clients_dir, len(old)
            )
            return frozenset(), frozenset()
        self._admitted.load()
        self.keys = self._admitted.text_keys()
        if not self.keys and old:
            log.warning("reload: %s holds no client key: every client is refused", self.clients_dir)
        return self.keys - old, old - self.keys

    def secure(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE server (call before bind)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def secure_server(
    ctx: zmq.asyncio.Context,
    sock: zmq.Socket[Any],
    server_secret: Path,
    clients_dir: Path,
) -> ServerCurve:
    """Authenticator started on ``ctx``, ``sock`` a CURVE server; returns it for stop()."""
    curve = ServerCurve(server_secret, clients_dir)
    curve.start(ctx)
    curve.secure(sock)
    return curve
