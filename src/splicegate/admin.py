"""``--admin HOST:PORT``: Prometheus ``/metrics`` and ``/healthz`` on gevent's WSGI server.

It runs in the same hub as the proxy, as greenlets of gevent.pywsgi, so it needs no thread
and cannot block the hub: a scrape formats counters held in memory. ``/healthz`` answers
200 while serving and 503 once draining, so a load balancer stops sending new clients while
open tunnels finish. A supervisor with workers answers for all of them (workers.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from gevent.pywsgi import WSGIHandler, WSGIServer

from splicegate.limits import unmapped
from splicegate.request import show_address

log = logging.getLogger("splicegate")

#: the Prometheus text exposition format
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Handler(WSGIHandler):
    """A request pywsgi cannot parse is the client's error, like a refused CONNECT: one
    INFO line that names the client, not an ERROR with the socket object's repr."""

    def log_error(self, msg: str, *args: Any) -> None:
        client = self.client_address
        # An IPv4 client of a dual-stack admin listener as itself, as the proxy logs it.
        who = show_address(unmapped(client)) if isinstance(client, tuple) else str(client)
        text = msg % args if args else msg
        # pywsgi names the client as "(from ('127.0.0.1', 5678))": once, in our form, is enough.
        text = text.replace(f"(from {client}) ", "").replace(f" (from {client})", "")
        log.info("admin: refused a request from %s: %s", who, text)


class AdminServer:
    """Serves ``metrics()`` at /metrics and ``serving()`` as /healthz on ``address``."""

    def __init__(
        self,
        address: tuple[str, int],
        metrics: Callable[[], bytes],
        serving: Callable[[], bool],
    ) -> None:
        self.metrics = metrics
        self.serving = serving
        # log=None: no access line per scrape; errors go to the splicegate log
        self._server = WSGIServer(
            address, self._app, log=None, error_log=log, handler_class=_Handler
        )
        self.address: tuple[str, int] = address

    def start(self) -> None:
        """Bind and serve; raises OSError naming the address."""
        host, port = self.address
        try:
            self._server.start()
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot serve --admin on {host}:{port}: {exc.strerror}"
            ) from None
        self.address = self._server.socket.getsockname()[:2]
        log.info("admin on http://%s (/metrics, /healthz)", show_address(self.address))

    def stop(self) -> None:
        self._server.stop(timeout=1)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        headers = []
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET or HEAD\n"
            headers.append(("Allow", "GET, HEAD"))  # a 405 must say (RFC 9110, 15.5.6)
        elif path == "/metrics":
            status, ctype, body = "200 OK", METRICS_TYPE, self.metrics()
        elif path == "/healthz":
            if self.serving():
                status, ctype, body = "200 OK", "text/plain", b"serving\n"
            else:
                status, ctype, body = "503 Service Unavailable", "text/plain", b"draining\n"
        else:
            status, ctype, body = "404 Not Found", "text/plain", b"/metrics or /healthz\n"
        headers += [("Content-Type", ctype), ("Content-Length", str(len(body)))]
        start_response(status, headers)
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]
