"""The DNS cache in front of any resolver (DESIGN.md, step 9).

Most of a tunnel's set-up time is DNS; a proxy that resolves per connection pays a round
trip to the nameserver for every CONNECT to a busy name. :class:`DnsCache` wraps a
:class:`~splicegate.resolve.Resolver` and

- merges concurrent lookups of one name into one *flight*: a greenlet of its own running
  the resolver once, which every waiter watches. Each waiter stops at its own deadline,
  and a flight is not tied to the greenlet that started it, so a client that goes away
  (its handler killed) never cancels the lookup the others wait for;
- keeps answers for the record TTL clamped to ``[min_ttl, max_ttl]`` (defaults 5 s and
  300 s, as in Unbound's ``cache-min-ttl``/``cache-max-ttl`` and Envoy's DNS cache), or
  for ``untimed_ttl`` (30 s, also clamped) when the resolver reports no TTL, as
  getaddrinfo does not; a *partial* answer (one family had no definite answer) only for
  ``min_ttl``;
- keeps failures (:class:`~splicegate.errors.DnsError`: NXDOMAIN, SERVFAIL, no address, no
  nameserver reachable) for ``negative_ttl`` (5 s), so a client retrying a dead name in a
  loop does not turn into a query storm. :class:`~splicegate.errors.DnsTimeout` is never
  kept: it says that *our* deadline expired, not what the name is, and the next client has
  a deadline of its own to try with;
- holds at most ``size`` names, evicting the least recently used.

Everything happens in the hub's thread with O(1) dictionary work per call, so the cache
never blocks the hub; waiting is done on a gevent event.
"""

from __future__ import annotations

import copy
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
from gevent.event import Event

from splicegate.errors import DnsError, DnsTimeout
from splicegate.resolve import (
    IPAddress,
    Resolution,
    Resolver,
    _no_address_error,
    _timeout_error,
)

__all__ = ["DnsCache"]

#: Defaults, also those of the CLI flags. 10,000 names at a few hundred bytes each is a few
#: MB; Squid's ipcache holds 1,024 by default, sized for the 1990s.
DEFAULT_SIZE = 10_000
DEFAULT_MIN_TTL = 5.0
DEFAULT_MAX_TTL = 300.0
DEFAULT_NEGATIVE_TTL = 5.0
#: How long an answer without a TTL (getaddrinfo) is kept, like nscd's default for hosts.
DEFAULT_UNTIMED_TTL = 30.0


@dataclass(slots=True)
class _Entry:
    """A cached answer (``addresses``) or failure (``error``), valid until ``expires``."""

    expires: float
    addresses: list[IPAddress] = field(default_factory=list)
    error: DnsError | None = None


@dataclass(slots=True, eq=False)
class _Flight:
    """One lookup in progress, shared by every waiter for the name.

    ``deadline`` is the deadline the resolver is running with now; ``latest`` the latest
    deadline of any waiter. When the resolver times out at ``deadline`` while a waiter
    still has time, the flight asks again with ``latest``, so a waiter that joined late
    gets all of its own budget without every such waiter sending a query of its own.
    """

    deadline: float
    latest: float
    done: Event = field(default_factory=Event)
    result: Resolution | None = None
    error: BaseException | None = None
    greenlet: gevent.Greenlet | None = None


class DnsCache:
    """A resolver that answers from memory when it can and asks ``resolver`` once when not.

    ``resolver`` is any object with ``resolve(host, deadline) -> [address, ...]``; when it
    also has ``lookup(host, deadline) -> Resolution`` (both built-in resolvers do), TTLs
    and partial answers come from there. ``size=0`` keeps nothing (lookups are still
    merged). ``clock`` is the clock for expiry only (deadlines are always
    ``time.monotonic()`` values); tests pass a fake one to step through TTLs.
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        size: int = DEFAULT_SIZE,
        min_ttl: float = DEFAULT_MIN_TTL,
        max_ttl: float = DEFAULT_MAX_TTL,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        untimed_ttl: float = DEFAULT_UNTIMED_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 0 or min_ttl < 0 or negative_ttl < 0:
            raise ValueError("cache size and TTLs must not be negative")
        if min_ttl > max_ttl:
            raise ValueError(f"min_ttl {min_ttl:g} is above max_ttl {max_ttl:g}")
        self.resolver = resolver
        self.size = size
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.untimed_ttl = untimed_ttl
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._flights: dict[str, _Flight] = {}
        #: counters for metrics and tests: answered from memory, merged into a flight,
        #: sent to the resolver (flights, each possibly asking more than once)
        self.hits = 0
        self.merged = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def resolve(self, host: str, deadline: float) -> list[IPAddress]:
        return self.lookup(host, deadline).addresses

    def lookup(self, host: str, deadline: float) -> Resolution:
        """The answer for ``host`` by ``deadline``: from memory, a flight, or a new one."""
        key = host.lower()  # DNS names are case-insensitive; a final dot is kept (search list)
        entry = self._fresh(key)
        if entry is not None:
            self.hits += 1
            if entry.error is not None:
                raise _copy(entry.error)
            return Resolution(list(entry.addresses), None)
        # Literals are never stored, so a hit is a name: parse only on a miss (the server
        # hands names alone, but an embedding application may not).
        try:
            return Resolution([ipaddress.ip_address(host)], None)
        except ValueError:
            pass
        budget = deadline - time.monotonic()
        if budget <= 0:
            raise _timeout_error(host, max(budget, 0.0))
        flight = self._flights.get(key)
        if flight is None:
            self.misses += 1
            flight = _Flight(deadline=deadline, latest=deadline)
            self._flights[key] = flight
            flight.greenlet = gevent.spawn(self._fly, key, host, flight)
        else:
            self.merged += 1
            flight.latest = max(flight.latest, deadline)
        flight.done.wait(timeout=max(deadline - time.monotonic(), 0.0))
        if not flight.done.is_set() or isinstance(flight.error, DnsTimeout):
            raise _timeout_error(host, budget)  # this waiter's budget, not the flight's
        if flight.error is not None:
            raise _copy(flight.error)
        assert flight.result is not None
        return Resolution(list(flight.result.addresses), flight.result.ttl, flight.result.partial)

    def close(self) -> None:
        """Stop every lookup in flight; their waiters get a DnsTimeout at once."""
        flights = [f.greenlet for f in self._flights.values() if f.greenlet is not None]
        gevent.killall(flights, timeout=1.0)

    # --- inside -----------------------------------------------------------------------------

    def _fresh(self, key: str) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def _ask(self, host: str, deadline: float) -> Resolution:
        lookup = getattr(self.resolver, "lookup", None)
        if callable(lookup):
            result = lookup(host, deadline)
        else:
            result = Resolution(list(self.resolver.resolve(host, deadline)), None)
        if not result.addresses:
            # A resolver returning nothing has failed; no caller should see an empty list.
            raise _no_address_error(host)
        return result

    def _fly(self, key: str, host: str, flight: _Flight) -> None:
        """The flight's greenlet: ask, store, wake the waiters. Never raises (a bug in the
        resolver is handed to the waiters, who re-raise it where the server logs it)."""
        try:
            # Bounded: each further pass needs a waiter whose deadline is later than the
            # one just reached, and each pass ends by its deadline.
            while True:
                try:
                    flight.result = self._ask(host, flight.deadline)
                    self._store(key, flight.result)
                    return
                except DnsTimeout as exc:
                    now = time.monotonic()
                    if now < flight.deadline or now >= flight.latest:
                        flight.error = exc  # a waiter's own deadline, not a cacheable answer
                        return
                    flight.deadline = flight.latest
                except DnsError as exc:
                    flight.error = exc
                    self._store_failure(key, exc)
                    return
                except Exception as exc:  # another refusal from a replaced resolver, or a bug
                    flight.error = exc  # passed on, never kept
                    return
        except BaseException:  # killed by close(): the waiters must not wait for nothing
            flight.error = _timeout_error(host, max(flight.latest - time.monotonic(), 0.0))
            raise
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()

    def _keep_for(self, result: Resolution) -> float:
        if result.partial:
            return self.min_ttl
        ttl = self.untimed_ttl if result.ttl is None else float(result.ttl)
        return min(max(ttl, self.min_ttl), self.max_ttl)

    def _store(self, key: str, result: Resolution) -> None:
        self._put(key, _Entry(self._clock() + self._keep_for(result), list(result.addresses)))

    def _store_failure(self, key: str, error: DnsError) -> None:
        if self.negative_ttl > 0:
            self._put(key, _Entry(self._clock() + self.negative_ttl, error=error))

    def _put(self, key: str, entry: _Entry) -> None:
        if self.size == 0 or entry.expires <= self._clock():
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


def _copy(error: BaseException) -> BaseException:
    """A fresh copy to raise: raising one stored exception again and again would grow its
    traceback with every raise, and a cached failure may be raised thousands of times."""
    try:
        return copy.copy(error).with_traceback(None)
    except Exception:  # an exception type copy cannot rebuild: raise the original
        return error
