"""A supervisor on in-memory parts (store, algorithm, inline pool and lister): no process, no socket."""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

from imgworker.config import Config, load_config
from imgworker.memstore import MemoryAlgo, MemoryStore
from imgworker.pool import InlinePool
from imgworker.supervisor import Supervisor, memory_parts

EVENTS = {"filer": "127.0.0.1:1.2"}  # [scan.events] for memory parts: no watcher process runs


def config(tmp_path: Any, **sections: dict[str, Any]) -> Config:
    overrides: dict[str, dict[str, Any]] = {
        "run": {"state_dir": str(tmp_path / "state"), "until_idle": True, "checkpoint_interval_s": 3600.0},
        "scan": {"interval_s": 0.01},
        "worker": {"count": 2, "threads": 1},  # one lane per worker: these tests step images one per worker
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_config(env={}, overrides=overrides)


def fill(store: MemoryStore, groups: list[str], per_group: int) -> list[str]:
    keys = [f"{g}/20240101-000000.{i:03d}.jpg" for g in groups for i in range(per_group)]
    for key in keys:
        store.put(key, b"\xff\xd8jpeg")
    return keys


def supervisor(cfg: Config, store: MemoryStore, algo: MemoryAlgo, *, late: int | None = None,
               **kwargs: Any) -> Supervisor:
    """A supervisor on in-memory parts; ``late`` (a seed) holds answers across steps and reorders them."""
    die_on = kwargs.pop("die_on", lambda item: False)
    parts = memory_parts(cfg, store, algo, die_on=die_on)
    if late is not None:
        prompt = parts.pool
        assert isinstance(prompt, InlinePool)
        parts = dataclasses.replace(parts, pool=InlinePool(prompt.count, prompt.process, die_on,
                                                           late=random.Random(late)))
    return Supervisor(cfg, show_progress=False, parts=parts, **kwargs)


def crash(sup: Supervisor) -> None:
    """What SIGKILL leaves behind: no shutdown, no checkpoint; the kernel drops the lock."""
    sup.lock.release()
    if sup.journal is not None:
        os.close(sup.journal._fd)  # type: ignore[arg-type]
        sup.journal._fd = None


class InlineWatcher:
    """Change events a test hands over, as the watcher process would send them."""

    def __init__(self, since_ns: int) -> None:
        self.since_ns = since_ns
        self.batches: list[Any] = []

    def waitables(self) -> list[Any]:
        return []

    def alive(self) -> bool:
        return True

    def exitcode(self) -> int | None:
        return None

    def poll(self) -> Any:
        return self.batches.pop(0) if self.batches else None

    def stop(self, timeout: float = 2.0, on_message: Any = None) -> None:
        """Like the real one: what was sent and not yet read is handed over, to the end."""
        while self.batches and on_message is not None:
            on_message(self.batches.pop(0))


def events_supervisor(cfg: Config, store: MemoryStore, algo: MemoryAlgo, watchers: list[InlineWatcher],
                      **kwargs: Any) -> Supervisor:
    def make_watcher(since_ns: int) -> InlineWatcher:
        watchers.append(InlineWatcher(since_ns))
        return watchers[-1]

    return Supervisor(cfg, show_progress=False, parts=memory_parts(cfg, store, algo, make_watcher=make_watcher),
                      **kwargs)


def event_batch(store: MemoryStore, keys: list[str], ts_ns: int) -> Any:
    from imgworker.events import ChangeEvent, EventBatch

    return EventBatch(events=[ChangeEvent(key=k, size=4, mtime=1.7e9, ts_ns=ts_ns) for k in keys], ts_ns=ts_ns)
