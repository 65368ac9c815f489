"""Coverage-guided fuzzing of the request parser with atheris (libFuzzer for Python).

    pip install atheris
    mkdir -p fuzz/corpus
    python fuzz/fuzz_request.py -max_total_time=60 -dict=fuzz/request.dict fuzz/corpus fuzz/seeds
    python fuzz/fuzz_request.py -runs=100000 fuzz/corpus fuzz/seeds    # a number of inputs

The invariant, as in h11's fuzz target: whatever the bytes and however they are split, the
parser returns a Request, NEED_DATA or CLOSED, or raises a splicegate ProxyError that knows
its status (400, 414, 431 or 505), an ASCII body, and a request line (if it kept one) fit for a
log; anything else, an IndexError, a UnicodeDecodeError, a RuntimeError, is a bug and
stops the run with the input that caused it. Fed whole and fed
in the fuzzer's chunks, the same head must meet the same fate.

The last four bytes of each input choose the limits and where the head is split (see
:func:`layout`); the bytes before them are the head. ``fuzz/seeds`` holds valid heads to
start from, each followed by such four bytes;
``fuzz/corpus`` (not committed) grows with what the fuzzer finds, and a crashing input is
written as ``crash-*``. libFuzzer's options (-max_total_time, -runs, -jobs ...) all apply.
Not part of the test suite: the suite runs a bounded hypothesis sweep of the same invariant
(tests/test_request.py).
"""

from __future__ import annotations

import itertools
import random
import sys

import atheris

with atheris.instrument_imports():
    from splicegate import errors
    from splicegate.request import CLOSED, NEED_DATA, Request, RequestParser

STATUSES = (400, 414, 431, 505)


def run(data: bytes, cuts: list[int], max_head_bytes: int, max_fields: int):
    """The parser's outcome for ``data`` split at ``cuts`` and then closed: the event, or
    the type of the ProxyError raised (checked to carry a status, a message, details)."""
    parser = RequestParser(max_head_bytes=max_head_bytes, max_fields=max_fields)
    bounds = [0, *sorted(cuts), len(data)]
    try:
        for low, high in itertools.pairwise(bounds):
            if high <= low:
                continue
            parser.receive_data(data[low:high])
            event = parser.next_event()
            if event is not NEED_DATA:
                return event
        parser.receive_data(b"")
        event = parser.next_event()
    except errors.ProxyError as err:
        if err.status not in STATUSES or not err.message or not err.details:
            raise AssertionError(f"unexpected refusal {err.status}: {err!r}") from err
        if not err.message.isascii():  # the client's bytes are quoted as escapes
            raise AssertionError(f"a body with raw client bytes: {err.message!a}") from err
        shown = parser.request_line  # what the log shows of a refused head
        if shown is not None and not all(s.isascii() and s.isprintable() for s in shown):
            raise AssertionError(f"a request line unfit for a log: {shown!a}") from err
        return type(err)
    if event is not CLOSED and not isinstance(event, Request):
        raise AssertionError(f"unexpected event {event!r}")
    if isinstance(event, Request) and len(event.fields) > max_fields:
        raise AssertionError(f"{len(event.fields)} fields passed a limit of {max_fields}")
    return event


def layout(raw: bytes) -> tuple[bytes, list[int], int, int]:
    """Head, cuts, max_head_bytes, max_fields from an input: the last four bytes are the
    parameters (two for the head limit, 64..4096; one for the field limit, 1..100; one
    seeding up to six cut points), so a seed is a plain head followed by four bytes."""
    data, params = raw[:-4], raw[-4:].rjust(4, b"\0")
    max_head_bytes = 64 + int.from_bytes(params[:2], "big") % 4033
    max_fields = 1 + params[2] % 100
    rng = random.Random(params[3])
    cuts = [rng.randrange(len(data) + 1) for _ in range(params[3] % 7)]
    return data, cuts, max_head_bytes, max_fields


def test_one_input(raw: bytes) -> None:
    data, cuts, max_head_bytes, max_fields = layout(raw)
    split = run(data, cuts, max_head_bytes, max_fields)
    whole = run(data, [], max_head_bytes, max_fields)
    if split != whole:
        raise AssertionError(f"split at {cuts}: {split!r}; whole: {whole!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
