"""A small DNS server for tests, so that no query ever leaves the machine.

It listens on loopback only (127.0.0.1, an ephemeral port, the same number for UDP and
TCP) and runs in a real OS thread with plain blocking stdlib sockets, not gevent: the test
process runs gevent in its main thread, and the proxy under test may run as a subprocess
that queries this server, so it must answer whatever the main thread is doing.

Behaviour is configured per name with :meth:`DnsServer.add`:

- records: ``a=[...]``, ``aaaa=[...]`` (with ``ttl``), or ``cname="target"``, which is
  followed inside the server, as a recursive resolver would, so the answer carries the
  chain and the target's addresses;
- a mode, for every type or per type (``modes={"AAAA": "drop"}``):

  ``answer``     the records (the default);
  ``nxdomain``   rcode NXDOMAIN;
  ``servfail``   rcode SERVFAIL;
  ``refused``    rcode REFUSED;
  ``noanswer``   NOERROR with an empty answer (NODATA);
  ``drop``       never answers;
  ``truncate``   over UDP an empty answer with TC set; over TCP the full answer;
  ``dropfirst``  ignores the first query per (name, type, transport), answers the rest
                 (a lost packet, to exercise retransmission);
  ``spoof``      first sends a reply with the wrong id carrying 127.0.0.99, then the real
                 answer (a stray packet the client must ignore).

Names not configured get ``default`` (NXDOMAIN unless told otherwise). Every query is
counted per (name, type, transport); see :meth:`DnsServer.count`.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

MODES = frozenset(
    (
        "answer",
        "nxdomain",
        "servfail",
        "refused",
        "noanswer",
        "drop",
        "truncate",
        "dropfirst",
        "spoof",
    )
)
SPOOFED_ADDRESS = "127.0.0.99"

#: How long the server thread sleeps in select() between checks of the stop flag.
_POLL = 0.05
#: A TCP client idle this long is dropped, so a silent client cannot hold a thread.
_TCP_IDLE = 5.0
#: Bounded waits for threads at stop().
_JOIN = 5.0
#: Longest CNAME chain followed inside the server.
_MAX_CHAIN = 8


def _key(name: str | dns.name.Name) -> str:
    """Names compare case-insensitively and with or without the final dot."""
    text = name.to_text() if isinstance(name, dns.name.Name) else name
    return text.rstrip(".").lower()


@dataclass
class Entry:
    """What the server knows about one name."""

    a: list[str] = field(default_factory=list)
    aaaa: list[str] = field(default_factory=list)
    cname: str | None = None
    ttl: int = 300
    mode: str = "answer"
    modes: dict[str, str] = field(default_factory=dict)  # per record type, e.g. {"AAAA": "drop"}

    def mode_for(self, rdtype: int) -> str:
        return self.modes.get(dns.rdatatype.to_text(rdtype), self.mode)


class DnsServer:
    """The server; a context manager that starts it and stops it (joining its threads)."""

    def __init__(self, *, default: str = "nxdomain") -> None:
        if default not in MODES:
            raise ValueError(f"unknown mode {default!r}")
        self.default = default
        self.host = "127.0.0.1"
        self.port = 0
        self._entries: dict[str, Entry] = {}
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._tcp_threads: list[threading.Thread] = []

    # -- configuration

    def add(
        self,
        name: str,
        *,
        a: Iterable[str] = (),
        aaaa: Iterable[str] = (),
        cname: str | None = None,
        ttl: int = 300,
        mode: str = "answer",
        modes: dict[str, str] | None = None,
    ) -> None:
        """Configure ``name`` (replacing what it had)."""
        modes = {k.upper(): v for k, v in (modes or {}).items()}
        for m in (mode, *modes.values()):
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r}")
        entry = Entry(list(a), list(aaaa), cname, ttl, mode, modes)
        with self._lock:
            self._entries[_key(name)] = entry

    def count(self, name: str, rdtype: str | None = None, transport: str | None = None) -> int:
        """Queries seen for ``name``, optionally only of one type ("A") or transport ("tcp")."""
        key = _key(name)
        with self._lock:
            return sum(
                n
                for (qname, qtype, qtransport), n in self._counts.items()
                if qname == key
                and (rdtype is None or qtype == rdtype.upper())
                and (transport is None or qtransport == transport)
            )

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to give a resolver: the same port serves UDP and TCP."""
        return (self.host, self.port)

    # -- lifecycle

    def start(self) -> DnsServer:
        """Bind and start serving; every fd the server uses exists when this returns."""
        self._bind()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._udp, selectors.EVENT_READ, "udp")
        self._selector.register(self._tcp, selectors.EVENT_READ, "tcp")
        self._thread = threading.Thread(target=self._serve, name="test-dns-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        threads = [t for t in (self._thread, *self._tcp_threads) if t is not None]
        for thread in threads:
            thread.join(_JOIN)
        if self._selector is not None:
            self._selector.close()
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"DNS server threads did not stop: {alive}")

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _bind(self) -> None:
        """UDP and TCP on one port number; retry a few ports if TCP's is taken."""
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            udp.setblocking(False)
            tcp.setblocking(False)
            self._udp, self._tcp, self.port = udp, tcp, port
            return
        raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")

    # -- serving

    def _serve(self) -> None:
        assert self._selector is not None
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=_POLL):
                if key.data == "udp":
                    self._serve_udp()
                else:
                    self._accept_tcp()

    def _serve_udp(self) -> None:
        assert self._udp is not None
        try:
            data, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        for reply in self._replies(data, "udp"):
            with contextlib.suppress(OSError):
                self._udp.sendto(reply, peer)

    def _accept_tcp(self) -> None:
        assert self._tcp is not None
        try:
            conn, _ = self._tcp.accept()
        except OSError:
            return
        thread = threading.Thread(
            target=self._serve_tcp, args=(conn,), name="test-dns-tcp", daemon=True
        )
        self._tcp_threads = [t for t in self._tcp_threads if t.is_alive()]
        self._tcp_threads.append(thread)
        thread.start()

    def _serve_tcp(self, conn: socket.socket) -> None:
        """Length-prefixed messages (RFC 7766) until EOF, idleness or stop."""
        with conn:
            conn.setblocking(True)
            conn.settimeout(_POLL)
            buffer = b""
            idle = 0.0
            while not self._stop.is_set() and idle < _TCP_IDLE:
                try:
                    chunk = conn.recv(65535)
                except TimeoutError:
                    idle += _POLL
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                idle = 0.0
                buffer += chunk
                while len(buffer) >= 2:
                    (length,) = struct.unpack("!H", buffer[:2])
                    if len(buffer) < 2 + length:
                        break
                    message, buffer = buffer[2 : 2 + length], buffer[2 + length :]
                    for reply in self._replies(message, "tcp"):
                        try:
                            conn.sendall(struct.pack("!H", len(reply)) + reply)
                        except OSError:
                            return

    def _replies(self, data: bytes, transport: str) -> list[bytes]:
        """The packets to send back for one query (none, one, or a spoof and the answer)."""
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return []
        if query.flags & dns.flags.QR or len(query.question) != 1:
            return []
        question = query.question[0]
        qkey = _key(question.name)
        rdtype_text = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self._counts[(qkey, rdtype_text, transport)] += 1
            seen = self._counts[(qkey, rdtype_text, transport)]
            entry = self._entries.get(qkey)
        mode = entry.mode_for(question.rdtype) if entry is not None else self.default

        if mode == "drop" or (mode == "dropfirst" and seen == 1):
            return []
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        if mode in ("nxdomain", "servfail", "refused"):
            response.set_rcode(dns.rcode.from_text(mode.upper()))
            return [response.to_wire()]
        if mode == "noanswer":
            return [response.to_wire()]
        if mode == "truncate" and transport == "udp":
            response.flags |= dns.flags.TC
            return [response.to_wire()]

        self._fill_answer(response, question.name, question.rdtype)
        replies = [response.to_wire()]
        if mode == "spoof":
            fake = dns.message.make_response(query)
            fake.id = (query.id + 1) % 65536
            fake.answer.append(dns.rrset.from_text(question.name, 300, "IN", "A", SPOOFED_ADDRESS))
            replies.insert(0, fake.to_wire())
        return replies

    def _fill_answer(
        self, response: dns.message.Message, qname: dns.name.Name, rdtype: int
    ) -> None:
        """The records for qname, following CNAMEs through the names this server knows."""
        owner = qname
        for _ in range(_MAX_CHAIN):
            with self._lock:
                entry = self._entries.get(_key(owner))
            if entry is None or entry.mode == "nxdomain":
                response.set_rcode(dns.rcode.NXDOMAIN)
                return
            if entry.cname is not None and rdtype != dns.rdatatype.CNAME:
                target = dns.name.from_text(entry.cname)
                response.answer.append(
                    dns.rrset.from_text(owner, entry.ttl, "IN", "CNAME", target.to_text())
                )
                owner = target
                continue
            values = {dns.rdatatype.A: entry.a, dns.rdatatype.AAAA: entry.aaaa}.get(rdtype, [])
            if values:
                response.answer.append(
                    dns.rrset.from_text_list(
                        owner, entry.ttl, "IN", dns.rdatatype.to_text(rdtype), values
                    )
                )
            return
