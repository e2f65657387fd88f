"""A TCP proxy in front of a PostgreSQL server that can cut its clients' side only.

``cut()`` closes the sockets towards the clients and keeps those towards the server open: the
server's session lives on (holding its locks) as after a partition or a dropped NAT entry,
while the client sees its connection gone.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

__all__ = ["CutProxy"]


class CutProxy:
    """Listens on 127.0.0.1:``port``; forwards to ``upstream`` (a unix socket path or a
    (host, port) pair)."""

    def __init__(self, upstream: str | tuple[str, int]) -> None:
        self.upstream = upstream
        self._listen = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listen.getsockname()[1]
        self._clients: list[socket.socket] = []
        self._servers: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _connect(self) -> socket.socket:
        if isinstance(self.upstream, str):
            up = socket.socket(socket.AF_UNIX)
            up.connect(self.upstream)
            return up
        return socket.create_connection(self.upstream)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listen.accept()
            except OSError:
                return
            server = self._connect()
            with self._lock:
                self._clients.append(client)
                self._servers.append(server)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        # One side ended: stop forwarding, but leave the server side open (see cut()).

    def cut(self) -> None:
        """Close every client side; the server sides stay open (their sessions live on)."""
        with self._lock:
            clients, self._clients = self._clients, []
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self, *_: Any) -> None:
        self._listen.close()
        self.cut()
        with self._lock:
            servers, self._servers = self._servers, []
        for sock in servers:
            sock.close()
