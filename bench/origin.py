"""The origin server for the benchmarks, run as its own process.

Two listeners on 127.0.0.1, ports chosen by the kernel and printed as one JSON line on
stdout (``{"echo": PORT, "stream": PORT}``):

* ``echo``: echoes every byte until EOF, then closes. Served by gevent, because the CONNECT
  rate test opens thousands of short connections a second, 50 at a time, and the idle test
  holds thousands open at once; a greenlet each is far cheaper than a thread each (an idle
  one is a parked greenlet and a socket, with no buffer held between reads). The process
  raises its open-file limit to the hard limit at start, so it can hold them.
* ``stream``: the sink or source of one bulk transfer (protocol in ``streams.py``). Served
  by one plain OS thread per connection with blocking sockets, because the transfer happens
  inside ``sendfile(2)`` and ``recv(MSG_TRUNC)`` with the GIL released; gevent would add a
  hub round trip per call and, for ``sendfile``, a copying fallback.

Its own process so that its CPU is neither the proxy's nor the load generator's, and can be
read separately from ``/proc``. It exits on SIGTERM or SIGINT, and when its stdin closes, so
it cannot outlive the benchmark that started it.

Usage from Python: ``with Origin.start() as origin: ... origin.echo ... origin.stream``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from types import TracebackType

import gevent
from gevent.event import Event
from gevent.server import StreamServer
from procs import raise_open_file_limit, terminate
from streams import (
    HEADER_SIZE,
    SINK,
    finish_receiver,
    finish_sender,
    parse_header,
    payload_file,
    receive_window,
    recv_exactly,
    send_until_stopped,
)

HOST = "127.0.0.1"
#: Bound on any single blocking socket call in the origin: nothing here may hang forever.
IO_TIMEOUT = 60.0
#: Slack over the announced window before a sender gives up on the receiver.
STOP_SLACK = 30.0

Address = tuple[str, int]


class Origin:
    """Handle on a running origin process: its pid, its two addresses, and how to stop it."""

    def __init__(self, proc: subprocess.Popen[bytes], echo: Address, stream: Address) -> None:
        self.proc = proc
        self.echo = echo
        self.stream = stream

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, timeout: float = 30.0) -> Origin:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout.fileno()], [], [], timeout)
            line = proc.stdout.readline() if ready else b""
            if not line:
                raise RuntimeError("the origin process did not report its ports")
            ports = json.loads(line)
        except BaseException:
            proc.kill()
            proc.wait(10)
            raise
        return cls(proc, (HOST, int(ports["echo"])), (HOST, int(ports["stream"])))

    def stop(self, timeout: float = 10.0) -> None:
        terminate(self.proc, timeout, timeout)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Origin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- the origin process ---------------------------------------------------------------------


def echo(sock: socket.socket, _address: Address) -> None:
    """Echo until EOF. Reads whatever is there (one recv), writes it back, repeats."""
    sock.settimeout(IO_TIMEOUT)
    try:
        while data := sock.recv(65536):
            sock.sendall(data)
    except OSError:
        pass  # a client that went away mid-echo is the client's error, counted there
    finally:
        sock.close()


def serve_stream(conn: socket.socket) -> None:
    """One transfer, as sink (receive and report the window) or source (send until told)."""
    with conn:
        try:
            conn.settimeout(IO_TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            role, seconds, warmup, file_size = parse_header(recv_exactly(conn, HEADER_SIZE))
            if role == SINK:
                window, _ = receive_window(conn, seconds, warmup)
                finish_receiver(conn, window.to_line())
            else:
                send_until_stopped(conn, payload_file(file_size), warmup + seconds + STOP_SLACK)
                finish_sender(conn)
        except (OSError, ValueError):
            # The client sees the failure too (short read, EOF, timeout) and reports it.
            traceback.print_exc(file=sys.stderr)


def accept_streams(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # listener closed at shutdown
        threading.Thread(target=serve_stream, args=(conn,), daemon=True).start()


def watch_stdin() -> None:
    """Runs in an OS thread: when the parent's pipe closes (it exited), stop as on SIGTERM."""
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    raise_open_file_limit()
    echo_server = StreamServer((HOST, 0), echo, backlog=4096)
    echo_server.start()
    stream_listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stream_listener.bind((HOST, 0))
    stream_listener.listen(64)
    threading.Thread(target=accept_streams, args=(stream_listener,), daemon=True).start()

    stop = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    threading.Thread(target=watch_stdin, daemon=True).start()

    ports = {"echo": echo_server.server_port, "stream": stream_listener.getsockname()[1]}
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    stop.wait()
    echo_server.stop(timeout=1)
    stream_listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
