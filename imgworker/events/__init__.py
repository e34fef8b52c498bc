"""Change events: new images found from the store's own notifications instead of re-listing the bucket.

    SeaweedFS filer ── weed filer.meta.tail ─stdout─▶ split_objects ─▶ seaweed_change ─┐   seaweed.py
    MinIO ── webhook POST ─▶ _WebhookServer ─▶ parse_minio ─────────────────────────────┼─▶ wanted() ─▶ pipe
    MinIO ── NATS JetStream (durable pull consumer) ─▶ parse_minio ─────────────────────┘   (EventBatch)
             minio.py (bodies, webhook)   nats.py                           messages.py: Batcher, Pipe

The watcher process (``watcher.py``) runs one source, ``scan.events.source``, and sends ``EventBatch``
messages to the supervisor, after one ``WatcherReady`` at start. Each source is a module with the
same ``run(cfg, pipe, since_ns, source)``; the table ``SOURCES`` picks it. A new source is one
module and one row there (and its name in ``EventsConfig.source``).

Each batch carries ``ts_ns``, the position to resume from: every event up to it has been sent, in
this batch or an earlier one. The SeaweedFS source resumes from a position with ``-timeAgo`` and
overlaps by ``OVERLAP_NS``, so an event may arrive twice (the supervisor's processed set absorbs
repeats, and keeps a finished key while a replay can reach it); when only events it does not want
went by, or none for ``QUIET_S``, it sends an empty batch now and then so the position moves on.

Acknowledged means durable. MinIO never sends an acknowledged event again, so a webhook answers
200, and the NATS source acks, only once the batch is in the pipe (``Pipe.send`` returned True);
the supervisor reads the pipe to its end in every case, into the backlog that its checkpoint saves:
  - stop: the supervisor sends STOP; the source stops acknowledging first (the webhook answers 503
    to every later POST, which MinIO keeps in its ``queue_dir`` and sends again; NATS naks what it
    fetched but could not put in the pipe), the SeaweedFS source sends what its batcher holds; the
    process exits, and ``Watcher.stop`` hands every message read until the pipe ends to its caller;
  - death: what a dead watcher sent is read the same way before it is replaced;
  - crash of the supervisor: events acknowledged before a checkpoint are covered by the start-up
    full listing (the first sweep after every start lists the whole prefix).
What was not acknowledged, MinIO (with ``queue_dir``) or JetStream sends again.

Keys are exactly the S3 keys. SeaweedFS's S3 gateway keeps multipart parts under the bucket's
``.uploads/`` folder; those are not objects and are skipped. Deletes and directories are skipped.
"""

from .messages import (
    OVERLAP_NS, Batcher, ChangeEvent, EventBatch, EventError, Pipe, SourceRun, WatcherMessage, WatcherReady, wanted,
)
from .watcher import SOURCES, Watcher, check_source, watcher_main

__all__ = [
    "OVERLAP_NS",
    "SOURCES",
    "Batcher",
    "ChangeEvent",
    "EventBatch",
    "EventError",
    "Pipe",
    "SourceRun",
    "Watcher",
    "WatcherMessage",
    "WatcherReady",
    "check_source",
    "wanted",
    "watcher_main",
]
