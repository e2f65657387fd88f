"""positiond: the position persistence daemon (server side).

Strategies use :mod:`positiond_client`; this package is the daemon they talk to.
"""

from positiond.config import Config
from positiond.server import Daemon

__all__ = ["Config", "Daemon", "__version__"]

__version__ = "0.1.0"
