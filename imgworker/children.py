"""The one helper for child processes: spawn context, signal hygiene, titles, death with the parent, stop.

Every child (worker, lister, ledger Manager) leaves only when the supervisor tells it to. A service
manager's stop signals the whole process group (systemd ``KillMode=control-group``, ``timeout``,
Ctrl-C in a terminal), so children ignore SIGTERM and SIGINT: the supervisor alone decides how a
run ends. SIGTERM and SIGINT are blocked in the supervisor while a child starts, so a signal that
lands between fork and the child's own set-up cannot kill it; the child inherits the blocked mask,
sets the signals to ignored, then unblocks them. A child also gets SIGKILL if the supervisor dies
(``PR_SET_PDEATHSIG``): nothing keeps calling the algorithm service for a supervisor that is gone.
A child started with ``spawn`` never writes to the terminal: its log records go over its own log
pipe to the supervisor's relay, which prints them (see ``logs``).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any

from .logs import LogSettings, relay, send_to_parent, setup_child_logging
from .proctitle import set_title

CTX: SpawnContext = multiprocessing.get_context("spawn")
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Block SIGTERM/SIGINT in this thread while children start; pending ones are delivered after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def child_setup(role: str, log_settings: LogSettings | None) -> None:
    """First call in every child: title, logging, ignore stop signals, die with the supervisor."""
    set_title(role)
    if log_settings is not None:
        setup_child_logging(log_settings, role)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    die_with_parent(signal.SIGKILL)


def die_with_parent(sig: int) -> None:
    """On Linux, receive ``sig`` when the parent process exits."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, int(sig))


def spawn(target: Callable[..., None], args: tuple[Any, ...], name: str) -> SpawnProcess:
    """Start ``target(*args)`` in a spawned child, with stop signals blocked around the start.

    The child gets its own log pipe, read by this process's log relay (see ``logs``): its records
    are printed by the supervisor, never written to the terminal by the child itself.
    """
    ours, theirs = CTX.Pipe(duplex=False)
    process = CTX.Process(target=_child_main, args=(theirs, target, args), name=name)
    try:
        with signals_blocked():
            process.start()
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()  # only the child holds the writing end: its death ends the pipe
    relay().adopt(ours)
    return process


def _child_main(log_conn: Connection, target: Callable[..., None], args: tuple[Any, ...]) -> None:
    """Every child's entry point: its log records go to ``log_conn``, then ``target(*args)`` runs."""
    send_to_parent(log_conn)
    target(*args)


def stop_processes(processes: Sequence[Any], deadline: float) -> None:
    """Wait for every process until one shared deadline, then SIGKILL the rest; always join.

    The caller has already told each process to leave (a stop message, or its channel closed).
    """
    alive = [p for p in processes if p.is_alive()]
    while alive and time.monotonic() < deadline:
        wait([p.sentinel for p in alive], max(0.0, deadline - time.monotonic()))
        alive = [p for p in alive if p.is_alive()]
    for process in alive:
        process.kill()
    for process in processes:
        process.join()


STOP = b""  # the message that tells a child to leave


class ChildHandle:
    """The supervisor's end of a helper child (lister, watcher): its pipe, its process, an ordered stop."""

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> None:
        ours, theirs = CTX.Pipe(duplex=True)
        self.conn: Connection = ours
        self.process = spawn(target, (*args[:1], theirs, *args[1:]), name)
        theirs.close()  # only the child holds that end: its death closes ours

    def waitables(self) -> list[Any]:
        return [self.conn, self.process.sentinel]

    def alive(self) -> bool:
        return self.process.is_alive()

    def exitcode(self) -> int | None:
        self.process.join(0)
        return self.process.exitcode

    def receive(self) -> bytes | None:
        """The next message if one is buffered; EOFError/OSError if the child is gone."""
        return self.conn.recv_bytes() if self.conn.poll() else None

    def decode(self, data: bytes) -> Any:
        """One message as ``stop`` hands it to its ``on_message`` (here the bytes)."""
        return data

    def stop(self, timeout: float = 2.0, on_message: Callable[[Any], None] | None = None) -> None:
        """Tell it to stop, read its pipe to the end meanwhile (a blocked send must finish), kill it after ``timeout``.

        Every message read goes, decoded, to ``on_message`` (without one it is dropped): what the child sent
        before it left, or before it died, stays in the pipe until read, and the pipe ends (EOF) only
        once the process is gone, so nothing it sent is lost here.
        """
        try:
            self.conn.send_bytes(STOP)
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        try:
            try:
                while self.process.is_alive() and time.monotonic() < deadline:
                    if not self._read_buffered(on_message, 0.05):
                        break
            finally:
                stop_processes([self.process], deadline)  # always reaped, even if on_message failed
            self._read_buffered(on_message, 0.0)  # what it sent just before it ended
        finally:
            self.conn.close()

    def _read_buffered(self, on_message: Callable[[Any], None] | None, wait_s: float) -> bool:
        """Hand over every message in the pipe (waiting up to ``wait_s`` for the first); False at its end."""
        try:
            while self.conn.poll(wait_s):
                data = self.conn.recv_bytes()
                wait_s = 0.0
                if on_message is not None:
                    on_message(self.decode(data))
        except (EOFError, OSError):
            return False
        return True
