"""Coverage-guided fuzzing of the request parser with atheris (libFuzzer for Python).

    pip install atheris
    mkdir -p fuzz/corpus
    python fuzz/fuzz_request.py -max_total_time=60 -dict=fuzz/request.dict fuzz/corpus fuzz/seeds
    python fuzz/fuzz_request.py -runs=100000 fuzz/corpus fuzz/seeds    # a number of inputs

The invariant, as in h11's fuzz target: whatever the bytes and however they are split, the
parser returns a Request, NEED_DATA or CLOSED, or raises a splicegate ProxyError that knows
its status (400, 431 or 505); anything else, an IndexError, a UnicodeDecodeError, a
RuntimeError, is a bug and stops the run with the input that caused it. Fed whole and fed
in the fuzzer's chunks, the same head must meet the same fate.

The first bytes of each input choose the limits and where the head is split; the rest is
the head. ``fuzz/seeds`` holds valid heads to start from (with their limit bytes in front);
``fuzz/corpus`` (not committed) grows with what the fuzzer finds, and a crashing input is
written as ``crash-*``. libFuzzer's options (-max_total_time, -runs, -jobs ...) all apply.
Not part of the test suite: the suite runs a bounded hypothesis sweep of the same invariant
(tests/test_request.py).
"""

from __future__ import annotations

import itertools
import sys

import atheris

with atheris.instrument_imports():
    from splicegate import errors
    from splicegate.request import CLOSED, NEED_DATA, Request, RequestParser

STATUSES = (400, 431, 505)


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
        return type(err)
    if event is not CLOSED and not isinstance(event, Request):
        raise AssertionError(f"unexpected event {event!r}")
    if isinstance(event, Request) and len(event.fields) > max_fields:
        raise AssertionError(f"{len(event.fields)} fields passed a limit of {max_fields}")
    return event


def test_one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    max_head_bytes = fdp.ConsumeIntInRange(64, 4096)
    max_fields = fdp.ConsumeIntInRange(1, 100)
    cut_count = fdp.ConsumeIntInRange(0, 6)
    cut_at = [fdp.ConsumeIntInRange(0, 4096) for _ in range(cut_count)]
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    cuts = [c % (len(data) + 1) for c in cut_at]
    split = run(data, cuts, max_head_bytes, max_fields)
    whole = run(data, [], max_head_bytes, max_fields)
    if split != whole:
        raise AssertionError(f"split at {cuts}: {split!r}; whole: {whole!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
