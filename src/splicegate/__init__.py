"""splicegate: an HTTP CONNECT forward proxy with a gevent control plane and a splice relay.

Embed it in a gevent application::

    from splicegate import Config, ProxyServer

    server = ProxyServer(Config(listen=["127.0.0.1:0"], allow_port=["443"]))
    server.start()
    print(server.address)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from splicegate._version import __version__

if TYPE_CHECKING:
    from splicegate.config import Config
    from splicegate.relay import TunnelRecord
    from splicegate.server import ProxyServer

__all__ = ["Config", "ProxyServer", "TunnelRecord", "__version__"]

#: imported when first asked for (PEP 562): the command's entry point is in this package,
#: and must run before these imports do (a third of a second; see _early.py)
_LAZY = {"Config": "config", "ProxyServer": "server", "TunnelRecord": "relay"}


if not TYPE_CHECKING:  # a type checker sees the imports above, not an Any for every name

    def __getattr__(name: str) -> Any:
        if name in _LAZY:
            return getattr(importlib.import_module(f"splicegate.{_LAZY[name]}"), name)
        try:  # a submodule, as `import splicegate; splicegate.dial.dial` found it before
            return importlib.import_module(f"splicegate.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"splicegate.{name}":
                raise
        raise AttributeError(f"module 'splicegate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
