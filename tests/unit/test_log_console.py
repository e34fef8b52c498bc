"""The console that log records and the status line share, and the relay of children's records, without processes."""

from __future__ import annotations

import io
import logging
import pickle

from imgworker.children import CTX
from imgworker.logs import Console, LogRelay


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_record_clears_the_status_line_and_draws_it_again_below():
    term = Terminal()
    console = Console(term)
    console.status("12 done")
    console.emit("a record")
    assert term.getvalue() == "\r\033[K12 done" + "\r\033[K" + "a record\n" + "12 done"
    console.end_status()
    console.emit("after the run")
    assert term.getvalue().endswith("12 done\nafter the run\n")


def test_a_record_that_is_not_a_record_neither_stops_the_relay_nor_loses_the_next_one():
    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record.getMessage())

    logger = logging.getLogger("imgworker.test_relay_garbage")
    keep = Keep()
    logger.addHandler(keep)
    relay = LogRelay()
    ours, theirs = CTX.Pipe(duplex=False)
    try:
        relay.adopt(ours)
        theirs.send_bytes(b"not a pickle at all")
        record = logging.LogRecord("imgworker.test_relay_garbage", logging.WARNING, __file__, 1, "the next record",
                                   None, None)
        theirs.send_bytes(pickle.dumps(record.__dict__))
        assert relay.drain(10.0)
        assert got == ["the next record"]
    finally:
        theirs.close()
        logger.removeHandler(keep)
