"""Cluster mode: several hosts share one NATS JetStream work queue and one outcome ledger.

It is a second queue and a second ledger behind the owners a single host already has, not a
second supervisor. Each host runs the ordinary ``Supervisor`` (its own state directory, results
file, worker processes and lanes); ``[cluster] url`` adds three things to it::

    leader only:  Intake (lister sweeps ─▶ OutcomeLedger.filter_new ─▶ backlog)
                    ─▶ ClusterHost.publish ─▶ [lease CAS] ─▶ work stream (Nats-Msg-Id bucket/key@version)
                  MinIO's stream ─▶ durable pull consumer ─▶ MinioRecords (events.py) ─▶ [lease CAS]
                    ─▶ work stream (same Nats-Msg-Id) ─▶ PubAck ─▶ ack MinIO's message  (link's loop)
    every host:   work stream ─▶ one durable pull consumer ─▶ ClusterHost.feed (no more than idle lanes)
                    ─▶ ledger get: counted already? ack ─ delivered > max_attempts? failed_worker ─ else:
                    ─▶ Dispatch ─▶ InFlight ─▶ Pool ─▶ Answer / Exit (as on one host)
                    ─▶ Recorder.finish ─▶ OutcomeClaims.claim (KV create-if-absent) ─▶ results journal
                       ─▶ Stats, Ledger, Janitor ─▶ OutcomeClaims.settled (ack, or term for failed_worker)
    stop:         draining ─▶ queued but not started: nak ─▶ in flight: drained ─▶ still held: nak

Who owns what stays as on one host: ``InFlight`` holds what a lane holds, ``Dispatch`` what waits
on this host, ``Recorder`` ends images. ``ClusterHost`` (``host.py``) only decides what the
shared queue and the shared ledger mean for them; ``JetStreamLink`` (``jetstream.py``) is the only
module that imports ``nats`` and the only place that talks to the server.

Why a thread: nats-py is asyncio and the supervisor's loop is synchronous and blocks in
``multiprocessing.connection.wait``. The client runs on its own event loop in one daemon thread of
the supervisor process; the loop calls it through ``JetStreamLink``'s blocking methods (each a
coroutine run with ``run_coroutine_threadsafe`` and a timeout). In that thread, and not in the
supervisor's loop, run the progress notes (``in_progress()`` every AckWait/3 for every message
this host holds) and the lease renewals, so a long ``wait`` or a checkpoint never lets a message
or the lease lapse. A thread and not a process: the host is one failure unit. SIGKILL or SIGSTOP
of the supervisor stops its notes and its lease with it, which is exactly what must make
JetStream hand its messages to others; a separate process would keep them alive for a dead host
and need a second pipe protocol.

The ledger decides "counted once", not the ack. Late acks and progress notes are accepted against
a redelivery, so an ack proves nothing. Every outcome is first written to the ledger bucket with
create-if-absent (``update(last=0)``, which, unlike ``create``, also fails on a delete marker) under
``sha256(bucket/key@version)`` (the object version as in ``Nats-Msg-Id``, ``image_version``: the ETag,
else ``<mtime>-<size>``; a new upload under the same name is a new image, a redelivery or re-publish
of the version is not, nor the same upload found once by its event and once by a sweep. Which uploads reach
the stream is intake's to say, as on one host: the leader's sweeps take a name in once, so a rewrite is
published when a MinIO event reports it, not when only a listing finds it); only the host whose write
created the key counts the image (results line, figures, actions), and only then is the message acked. A host that loses the race (it was
SIGSTOPped past AckWait, or partitioned) acks and writes nothing. A delivery whose key is already
in the ledger is acked and not analysed. Ledger keys are never deleted, purged or given a TTL:
``create`` succeeds again on a deleted key.

Every ledger entry ends with exactly one results line and its actions, on the host that created it.
Its entry carries everything its line needs (``LedgerEntry.result()``). A host that dies between
its ledger write and its line (SIGKILL, power, a failed results write, a forced stop after an
unanswered write that landed) would leave an entry counted and journaled nowhere: the redelivery
finds it counted and only acks. So each claim is first recorded, fsynced, in the host's
``cluster-claims.jsonl`` (``intents.py``), and is done once its line is written; at start, before
any new work, ``ClusterHost.recover`` looks up the claims still open and, where the ledger holds the
claim's own entry (same token) and the results file no line for it, writes the line and plans its
actions. The host restarts under the same name and state directory (a service manager does). Why an
intent file and not a ledger scan: ledger keys are hashes, so "this host's entries" means reading
every entry, O(ledger) per start; the intent file holds only the claims of the last moments, at
the price of one local fsync per claim (next to the KV write's round trip, and matching a server
run with ``sync_interval: always``). Only the creator writes the line, so a host that was merely
paused never writes a second one.

Redelivery and attempts: a host fetches no more than its idle lanes, with a fetch timeout far
below AckWait, so nothing waits in a client buffer while its AckWait runs. A delivered image
starts at ``attempt = num_delivered``; the local retries after a worker death count on from there.
A delivery with ``num_delivered > worker.max_attempts`` (earlier holders died, whole hosts
included) ends ``failed_worker`` in the ledger and is ``term()``ed: the stream's MaxDeliver is only
a backstop, and its advisory is not relied on.

Intake leader: one host at a time holds the lease, a key of the lease bucket created with a
per-message TTL (``lease_ttl_s``) and renewed by compare-and-set on its revision every third of
the TTL. Fencing: every publish batch is preceded by that compare-and-set on the revision the
leader holds, which stamps the new revision; a deposed leader's CAS fails and its batch is not
published. Publishes carry ``Nats-Msg-Id`` = ``bucket/key@<etag>`` (``image_version``; ``<mtime>-<size>``
where the store gives no ETag), so repeated sweeps and events, and a new leader's first sweep, are stored once within
``duplicate_window_s``; beyond it a duplicate is acked at delivery by the ledger check. A full stream
(``max_msgs``, discard new) refuses the publish: the images go back to the leader's backlog and
intake waits (backpressure); nothing is dropped.

Retention: the cleaner runs on the intake leader only (``retention.py``), with ``queued`` or
``lease``; an image is DONE once its ledger entry exists, and ``lease`` gives up only images no host
can have been handed (the leader's own backlog, and published messages above the consumer's
delivered sequence, withdrawn from the stream and checked again). ``none`` and ``inflight`` are
refused by the config: they need to know which host holds what. Expiry (``retention.external_*``) is
decided on the leader too (``expiry.py``): it observes every image intake takes in (the count rule), skips
publishing the already doomed, and after each complete listing drops the doomed of its backlog directly
and the published, undelivered ones through the cleaner's fence (``ClusterCleaner.through_fence``), each
image's wait being its place in line over the rate the consumer's delivered sequence advances. Every
host still applies ``ExpiryGuard.drops`` to the deliveries it fetched (it holds them: a safe last guard).

Change events (``scan.mode = "events"``, source ``minio_nats`` only): MinIO publishes into an existing
stream, with no ``Nats-Msg-Id``, on one subject, keys URL-escaped. No watcher process runs; the lease
holder's link reads that stream through one durable pull consumer (``scan.events.nats_durable``, shared
by whichever host leads) on its own loop, next to the lease it is fenced by. Per fetched batch: the
CAS on the lease, then each wanted image is published with its ``Nats-Msg-Id``, and each MinIO
message is acked only after the PubAcks of its images (a delete, another bucket, an unwanted key:
acked, nothing published; a malformed body: termed). A full work stream naks the rest with a delay and
the leader stops fetching a while: nothing is acked unpublished. A deposed leader fetches no more;
what it fetched is naked when its CAS fails, or comes again after AckWait if it died. Why the link and
not the watcher process: the watcher acks once events are in a pipe to local memory, so a leader's
death could lose them until the next reconciliation sweep; here an ack means "in the work stream".
Reconciliation sweeps still run on the leader every ``scan.reconcile_interval_s``. While MinIO's stream
is missing, the leader logs an error once, goes on by sweeps, and looks again every few seconds.

Not in cluster mode (refused by the config): change events from other sources (the SeaweedFS filer,
the MinIO webhook), and the cleaner's ``none`` and ``inflight`` protection.

Failure semantics (what each part's death means):

- a worker process: as on one host, retried locally; its attempts count on from ``num_delivered``.
- a whole host (SIGKILL, power): its progress notes stop; after AckWait its messages go to others.
  Only the images it held are analysed twice; the ledger keeps one outcome each.
- a paused host (SIGSTOP, GC, partition) past AckWait: as above; when it resumes, its late outcomes
  lose the create race and are not counted.
- the intake leader: its lease expires after at most ``lease_ttl_s``; another host creates it.
- nats-server for a while: the client reconnects on its own; fetches return nothing, a claim waits
  and retries (its own earlier write is recognised by its token) for as long as the server is away;
  only a forced stop ends the wait, handing the image back unrecorded (redelivered later; should the
  unanswered write land after all, the next start journals it, see below).
- nats-server's own power: an entry is durable only once the server has it on disk. Run it with
  ``sync_interval: always`` (or R3 on separate failure domains); by default it fsyncs every 2 min.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..outcomes import ImageRef


def object_version(mtime: float, size: int) -> str:
    """An object's version from its last-modified time and size (``<mtime in µs>-<size>``), for a ref without ETag."""
    return f"{int(mtime * 1e6)}-{size}"


def image_version(ref: ImageRef) -> str:
    """The version ``Nats-Msg-Id`` and the ledger key name: the ETag (quotes stripped), else ``object_version``.

    The ETag, because a listing and a change event agree on it: a MinIO event's time is not the
    listed LastModified, so the same upload found by both would otherwise be two versions.
    """
    etag = ref.etag.replace('"', "")
    return etag if etag else object_version(ref.mtime, ref.size)


def ledger_key(bucket: str, key: str, version: str) -> str:
    """The ledger's key for one version of an image: a fixed-length hash (object keys may hold characters KV keys
    may not). A new upload under the same name is a new image; a redelivery or re-publish of the version is not."""
    return hashlib.sha256(f"{bucket}/{key}@{version}".encode()).hexdigest()[:40]
