"""Where the metrics endpoint listens: ``HOST:PORT`` (``[::1]:PORT`` for IPv6), checked.

Loopback only unless ``metrics_allow_remote`` says otherwise: /metrics tells anyone who can
reach it how many strategies run and crash, and it has no authentication of its own. Put a
remote Prometheus behind an SSH tunnel, or set the flag and filter the port with a firewall.
"""

from __future__ import annotations

import importlib.util
import ipaddress
from typing import NamedTuple

__all__ = ["Listen", "MetricsError", "available", "parse_listen"]


class MetricsError(RuntimeError):
    """The endpoint could not be opened: the daemon does not start.

    ``permanent``: a restart cannot help (the address is not this host's, the sandbox allows
    no TCP socket, the port is privileged), so the daemon exits 2 like for an invalid setting;
    otherwise (the port is taken) 1, and systemd tries again.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Listen(NamedTuple):
    host: str  # an IP address literal
    port: int  # 0: any free port (the one bound is logged and in status.json)

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"


def parse_listen(text: str, *, allow_remote: bool = False) -> Listen:
    """``"127.0.0.1:9464"`` -> Listen; ValueError (a one-line reason) for anything else."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9464")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (e.g. 127.0.0.1:9464)") from None
    try:
        port = int(port_text, 10)
    except ValueError:
        raise ValueError(f"{port_text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is not within [0, 65535]")
    if not address.is_loopback and not allow_remote:
        raise ValueError(
            f"{host} is reachable from other hosts and /metrics has no authentication: "
            "listen on 127.0.0.1 (or [::1]), or set metrics_allow_remote = true"
        )
    return Listen(str(address), port)


def available() -> bool:
    """Is prometheus_client installed (the ``metrics`` extra)?"""
    return importlib.util.find_spec("prometheus_client") is not None
