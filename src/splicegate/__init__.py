"""splicegate: an HTTP CONNECT forward proxy with a gevent control plane and a splice relay.

Embed it in a gevent application::

    from splicegate import Config, ProxyServer

    server = ProxyServer(Config(listen=["127.0.0.1:0"], allow_port=["443"]))
    server.start()
    print(server.address)
"""

from splicegate._version import __version__
from splicegate.config import Config
from splicegate.relay import TunnelRecord
from splicegate.server import ProxyServer

__all__ = ["Config", "ProxyServer", "TunnelRecord", "__version__"]
