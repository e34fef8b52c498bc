"""Rebuild benchmarks/README.md from the latest tables in benchmarks/results/.

    python -m benchmarks.make_readme
"""

from __future__ import annotations

import os

from ._common import RESULTS

HERE = os.path.dirname(os.path.abspath(__file__))

SECTIONS = [
    ("peers", "imgworker beside its peers: bare threads and Celery",
     "`python -m benchmarks.peers` (`--quick` for N = 4, 8). The same job (StatObject, presign, POST to a "
     "200 ms service that fetches the image) done by imgworker finding images from change events "
     "(`imgworker`: N worker processes; `imgworker-lanes`: N lanes as N / 8 processes of 8 threads, "
     "`--threads 8`) and by listing every second (`imgworker-listing`; `imgworker-lanes-listing` with lanes), "
     "by N bare threads in one process "
     "(the floor: no dispatch, no discovery), and by Celery prefork workers with valkey as broker "
     "(`-Ofair`, acks_late, prefetch 1), side by side in one run on the same store, service and images. "
     "`cpu_s_per_1000_<role>` in the JSON splits imgworker's CPU by process.", "peers.png"),
    ("peers-n32", "Listing mode beside events mode, N = 32",
     "`python -m benchmarks.peers --workers 32 --name peers-n32`: the same ways at N = 32 only, in one run "
     "of this round, with lanes in listing mode (`imgworker-lanes-listing`, the default discovery mode) "
     "beside lanes on change events.", "peers-n32.png"),
    ("discovery", "Finding new images in a bucket of 100,000: events against listing",
     "`python -m benchmarks.discovery` (`--quick` for a small bucket). 100,000 objects already processed "
     "are retained; then 30 new images a second arrive. Discovery = upload to dispatch.", "discovery.png"),
    ("adaptive", "Adaptive concurrency against a service whose capacity changes",
     "`python -m benchmarks.adaptive --phase-s 45 --images 11000`. The synthetic service serves a fixed number of calls at once and "
     "queues the rest; it goes from 8 to 24 to 6 slots at 200 ms a call, then slows to 400 ms (45 s a "
     "phase, after an 8 s warm-up). The same pipeline (events mode, lanes of 8) runs adaptive (ceiling 64, "
     "p95 budget 600 ms), fixed 64 and fixed N at the knees, one way after the other in one run; the best "
     "fixed N of each phase is marked. p50/p95 are of the algorithm call as imgworker timed it, queueing "
     "at the service included.", "adaptive.png"),
    ("adaptive-face", "Adaptive concurrency against the real face detector",
     "`python -m benchmarks.adaptive --backend face --rounds 4 --round-s 10 --images 1500`. The service is the real face "
     "detector (scikit-image's LBP cascade on the photos scikit-image ships, a thread per core), on this "
     "2-core machine beside the store and imgworker, so its knee is set by CPU, not by a slot count. The "
     "ways, adaptive (ceiling 64, p95 budget 600 ms), fixed 64 and fixed 8, 4, 2, are interleaved: 4 rounds "
     "in which each way runs once (an 8 s warm-up, then 10 s measured), the order rotated every round, so "
     "load from elsewhere on the shared machine falls on every way alike; figures are each way's totals, "
     "with its throughput round by round.", "adaptive-face.png"),
    ("tune", "Workers against throughput: `imgworker tune`",
     "`python -m benchmarks.tune --latency-ms 200` (the same as `imgworker tune` with its outputs here). "
     "The real pipeline (supervisor, N workers, Manager, scanner process) against the embedded store, "
     "pre-filled, and the synthetic service with a fixed 200 ms latency, all on this one 2-core machine. "
     "Each N is measured after a warm-up, in windows of at least 50 expected completions, until three "
     "agree within 5 % (at most 8). Ideal = N / measured mean algorithm latency. Overhead = end to end "
     "(supervisor send to reply) minus the algorithm call; it includes the StatObject check unless said. "
     "CPU counts the supervisor, workers, scanner and Manager, not the store or the service.", "tune.png"),
    ("lanes", "Processes x lanes: `imgworker tune` over a grid",
     "`python -m benchmarks.lanes` (the same as `imgworker tune --total 8,16,32,64 --lanes 1,4,8,16 "
     "--latency-ms 100 --images 8000 --max-windows 5` with its outputs here). Each N images in flight is run "
     "as N processes of one lane and as N / 4, N / 8, N / 16 processes of 4, 8, 16 lanes, against the "
     "embedded store, pre-filled, and the synthetic service at a fixed 100 ms, all on this one 2-core machine. "
     "CPU and RSS count every imgworker process of the run (supervisor, workers, scanner, Manager), not the "
     "store or the service; RSS total peak is the most they held together. The recommendation and the "
     "initial `--adaptive` limit are `imgworker tune`'s rule (see the README's \"Sizing: processes and "
     "lanes\").", "lanes.png"),
    ("check_vs_waste", "The existence check against the inference it saves",
     "`python -m benchmarks.check_vs_waste`. Images are queued, a fraction is deleted just before "
     "dispatch, and the run is repeated with the check on and off.", "check_vs_waste.png"),
    ("scenario", "Retention policies under one load: `imgworker scenario`",
     "`python -m benchmarks.scenario` (`--quick` for the reduced run). `never seen` are images deleted "
     "before the scanner listed them; `fail/success` is the figure the original report used, "
     "`fail/attempted` divides by every image that reached the algorithm step or failed on the way; "
     "`peak objects` is the most objects left after a cleaning pass.", None),
    ("scenario-quick", "The same, reduced (`--quick`)", "", None),
    ("cluster", "More than one host: what JetStream costs per image",
     "`python -m benchmarks.cluster --images 400 --lanes 16` (L = 200 ms; nats-server with `sync_interval: always`, object versions by ETag). The same images through one "
     "supervisor with N lanes on local pipes (`local`), one through JetStream (`jetstream-1`: intake leader and "
     "consumer in one), and two with N/2 lanes each sharing one loopback nats-server (`jetstream-2`), side by "
     "side in one run on this 2-core machine. CPU is each host's process tree (supervisor and every child it "
     "reaped) and nats-server's own, per 1,000 images; efficiency is images/s over N / L from the first outcome "
     "to the last; e2e is dispatch to outcome (it now includes the ledger's create-if-absent round trip). "
     "Per image, cluster mode adds five JetStream requests: the leader's publish, a share of one fetch, the "
     "ledger lookup at delivery, the ledger create and the ack (progress notes only for calls longer than "
     "AckWait/3). **What would limit 10 hosts x 64 lanes at 200 ms** (6,400 in flight, 32,000 images/s), "
     "from these figures: nats-server CPU first. At about 1.6 CPU-s per 1,000 images here (1.1 before every write was "
     "fsynced) it needs some 50 "
     "of these cores, so one server cannot do it. Then the KV writes: 32,000 creates/s into one bucket, "
     "three times over with R3 (one Raft group). Then about 1-1.5 KB per image on the wire (a ~120-byte "
     "message with a ~100-byte Msg-Id, a ~350-byte ledger value, and the request, reply and ack subjects), "
     "so 40-50 MB/s client traffic, and about 3x that between nodes with R3. The next steps are to skip "
     "the ledger lookup on first deliveries, to batch the acks, and to split the stream and the ledger by "
     "task type over several servers.", None),
    ("algo_service", "The reference algorithm service", "`python -m benchmarks.algo_service`.", None),
    ("dispatch", "Dispatch capacity", "`python -m benchmarks.dispatch`.", None),
    ("ledger", "The processed set behind its Manager", "`python -m benchmarks.ledger`.", None),
    ("checkpoint", "What a checkpoint writes with a large backlog", "`python -m benchmarks.checkpoint`.", None),
    ("scanner", "Listing and filtering a large bucket", "`python -m benchmarks.scanner`.", None),
]

INTRO = """# imgworker benchmarks

Every figure here was measured on the project's 2-core machine, with every process (store, service,
imgworker) on it. Machines are shared and noisy: compare ratios measured in one run, not absolute
numbers across runs. Each script writes `results/<name>.json` and `results/<name>.md`; plots are PNG.
Rebuild this page with `python -m benchmarks.make_readme`.

## What the figures say

- **Beside its peers** (peers, L = 200 ms, N = 16/32/64 images at once): with lanes (`--threads 8`,
  N / 8 processes) imgworker on change events reaches 0.98-1.02x the bare-thread floor's efficiency
  and uses 1.15x, 1.18x and 1.35x its CPU per image at N = 16, 32, 64 (the goal at N = 32: 0.97x and
  1.3x). The setting `algo.trust_env = false` (no proxy or ~/.netrc lookup per call; the floor and
  Celery keep requests' default) is part of that: with it on (`imgworker-lanes-env`) the figures are
  0.97-1.02x and 1.26x, 1.27x, 1.44x. With one process per image (`--threads 1`, the default
  until lanes were measured) CPU is 1.73-1.84x the floor's at the same efficiency (0.98-1.00x).
  Split by process at N = 32, in CPU-s per 1,000 images: workers 1.99 with lanes against 3.04
  without, supervisor 0.34 against 0.44 (fewer
  pipes to wait on), scanner 0.06, Manager 0.01; the floor spends 2.05 in all. One process per image
  costs more because every image wakes its own process through its pipe, with caches cold, on a
  2-core machine shared with the store and the service; lanes wake one of N / 8. Celery prefork needs
  2.5-3.1x the floor's CPU and falls to 0.75x its efficiency at N = 64; listing the bucket every
  second instead of change events costs 0.8-1.7 CPU-s more per 1,000 images.
- **Listing mode beside events mode** (peers-n32, N = 32, L = 200 ms, one run): re-listing the
  pre-filled prefix (2,400 objects, every second) no longer costs more than change events do. The
  lister process takes 0.06 CPU-s per 1,000 images, down from 0.78 in the previous round, when minio
  parsed every page (about 70 us per object in `Object.fromxml`). imgworker now parses ListObjectsV2
  pages itself, at about 9 us per object. A page whose bytes did not change since the last listing
  is not parsed again: about 0.3 us per object for the hash and look-up, plus 1 us for the filter
  (`python -m benchmarks.listing`, `results/listing.md`). Two runs one after the other on a quiet
  machine (load average about 1-3), CPU per image against the floor's: lanes in listing mode 1.29x and
  1.06x, lanes on change events 1.21x and 1.21x, all at 0.94-1.01x the floor's efficiency; one process
  per image 1.66x and 1.26x listing, 1.56x and 1.31x on events (the table is the second run). So
  listing mode with lanes is within the 1.3x goal in both runs, and no longer dearer than change
  events: the run-to-run spread (0.2x) is larger than the difference between the modes. Under heavy
  load (an earlier run at load average 30-58) every way of imgworker's several processes lost more
  to contention than the floor's one: 1.48x listing and 1.66x events.
- **Discovery in a bucket of 100,000** (discovery, 30 new images a second): on change events an image
  reaches a worker about 50 ms after its upload at p50 (the watcher's 50 ms batching window), against
  seconds when listing (one listing of 100,000 objects takes 5-7 s on a quiet machine, 10-38 s in the
  loaded run below). **The supervisor's own CPU**, idle / under load, as % of one core: events with a
  full reconciliation every 10 s 0.6 / 2.4, incremental reconciliation 0.1 / 2.5, listing every second
  0.8-2.0 / 1.3-2.6. Before the loop waited on the lister's pipe it polled with a zero timeout for the
  whole of every listing: 22.7 / 32.3, 1.4 / 2.5 and 80.5 / 70.3 % in the same benchmark (the previous
  results). What listing still costs is the lister process's own work (it parsed the whole bucket every
  pass: 34-71 % of a core here, measured before imgworker parsed pages itself and remembered unchanged
  ones; not rerun since), not the supervisor's.
- **Processes x lanes** (lanes, L = 100 ms, N = 8-64, on a 2-core machine shared with other
  benchmarks, load average 6 at the start and 26 at the end): 8 lanes per process used 8-39 % less
  CPU per image than one process per image at every N (3.92 / 3.39 / 2.44 / 2.80 against
  4.28 / 4.42 / 4.02 / 3.54 CPU-s per 1,000 at N = 8 / 16 / 32 / 64), and on this CPU-bound machine
  that is throughput: one process per image reached 0.79, 0.66 and 0.55 of N / latency at
  N = 16, 32, 64, 8 lanes 0.93, 0.91 and 0.71. Memory is the larger difference: each worker process
  is an interpreter of about 52 MB, so every imgworker process together held 3,530 MB as 64
  processes of one lane, 1,063 MB as 16 of 4, 652 MB as 8 of 8 and 446 MB as 4 of 16. 16 lanes were
  cheaper than 8 at N = 16 and 64 (3.21 and 2.30) and dearer at N = 32 (2.62 against 2.44);
  `imgworker tune`'s rule recommends 4 processes x 16 lanes (the least CPU per image within 95 % of
  the best throughput, 347 img/s), and, since throughput still grew at N = 64, reports the knee as
  not reached and 64 as the initial `--adaptive` limit. The default `worker.threads` is 8, not 16:
  most of the gain is from 1 to 8, and the default also sets how many calls are in flight before
  anyone sizes N (see the README's "Sizing: processes and lanes"). Two earlier runs the same hour,
  at loads up to 40-50, ranked the configurations the same way on CPU and memory (8 lanes 10-23 %
  below one lane at N = 32 and 64) but not on throughput, which such load decides.
- **Adaptive concurrency** (adaptive, a service of 8 -> 24 -> 6 slots at 200 ms, then 400 ms; 45 s a
  phase, one run on a 2-core machine with nothing else running, load average under 1): fixed 64 keeps
  the service's queue full, so its p95 is 8-11x the call time at 8 and 6 slots (1,673 and 2,195 ms),
  and after the slowdown 384 calls time out (3 s) and throughput falls to 1.6 images/s. Adaptive
  (ceiling 64, budget 600 ms) reaches 0.99, 0.98, 1.00 and 0.97x the best fixed N's throughput in the
  four phases, with no failed call, and its p95 is within the budget in every phase, the seconds after
  each step included: 383, 302, 431 and 530 ms. **The 24 -> 6 step**: the window that showed the flood
  closed early, and the limit went 31 -> 10 within 1.0 s; the probe at 10 (a third of the old limit,
  over the new knee) found calls 1.6x slower, measured again at 4, found the old speed there, so the
  server had fewer slots, not slower ones, and the limit went to 11 (the knee of 6 plus the band) 4.2 s
  after the step. The run before these changes (30 s phases) had a whole-phase p95 of 949 ms there:
  its first window ran its full second at the old limit, and the calls it sent queued behind the
  others. **After the slowdown** adaptive answered 14.4 images/s at a p95 of 530 ms; the best fixed N by
  throughput, fixed 8, answered 15.0 at 650 ms (over the budget), fixed 6 14.8 at 471 ms: the limit
  went 11 -> 6 -> 3 (a probe, 2x slower at every depth) -> 6, tried 7 once, and held 6. The
  virtual-clock simulation of the same phases (tests/unit/test_adaptive.py; 60 seeds checked while
  building it) holds the limit's time-weighted mean within [c, c + band + 1] and the p95 within the
  budget in at least 95 % of windows in all but a few seeds (2 of 30, then 6 of the next 30, phases
  that miss one range by a little: a probe that measured a baseline a few % fast holds the limit a
  call under a knee of 6 for a while); the suite asserts seeds 1-6 of each.
- **Adaptive concurrency against the real face detector** (adaptive-face, the ways interleaved: 4
  rounds of 10 s a way after an 8 s warm-up, the order rotated; budget 600 ms; the service decodes
  and runs the LBP cascade on a thread per core, so its knee is about the machine's 2 cores, shared
  with the store and imgworker; run on an otherwise quiet machine, load average under 1 at the start):
  the rounds agree within about 7 % for every way. Adaptive answered 18.1 images/s, 0.99x the best
  fixed N (fixed 4: of the ways within 2 % of the most throughput, the lowest p95; 18.2) and 0.98x
  fixed 8 (18.4), at a p95 of 377 ms against fixed 8's 498 ms, holding about 5 calls in flight (4.8
  on average): the knee of a CPU-bound server, found without a slot count to read. Fixed 2 answered
  17.8 (p95 214 ms). Fixed 64 answered nothing: every round its 64 calls queued past the 3 s timeout
  (768 failed calls) and the endpoint was ejected. The run before the last controller changes gave
  17.1 images/s for adaptive, 1.01x fixed 8, at 344 ms.
  An earlier run of the same benchmark on a machine loaded by other work (load average 9-14) spread
  widely from round to round (fixed 8: 4.7-12.0 images/s); there adaptive held 1-4 calls and stayed
  within the budget at 0.73x fixed 8, whose p95 was three times the budget.
- **Efficiency against the limit N / latency** (tune, L = 200 ms): 0.98-0.99 for every N up to 32,
  the goal being 0.95. At 64 and 128 the 2-core machine runs out of CPU: the store, the service and
  imgworker share it, the measured algorithm latency itself rises (232 and 307 ms at p50), and
  efficiency falls to 0.94 and 0.86. On a large host this is where to measure again.
- **Per-image overhead** (end to end minus the algorithm call): without the existence check 0.4-0.7 ms
  at p50 and 3-6 ms at p99 for N up to 32 (goal: under 1 ms and 5 ms; p99 is over 5 ms from N = 16 on
  this 2-core machine). The check itself is one StatObject round trip, 1.4-1.7 ms at p50 under load
  (0.5-0.6 ms alone), so the overhead with the check on is 2-3 ms at p50.
- **CPU per 1,000 images** at small N is dominated by the scanner re-listing the pre-filled bucket
  (8,000 objects every 0.5 s, about 0.3 CPU-seconds a second); at N = 32 it is 4.75 CPU-s per 1,000.
- **The existence check** costs about 2 ms of worker time per image. With a service that answers a
  gone image with a quick 404, a gone image wastes only 6-10 ms, so the check pays only when more than
  about 20 % of queued images disappear. If a gone image cost the service its full latency, the
  break-even would be about 1 %: the report's 2.40 % is above that.
- **Retention** (scenario): `inflight` without the check reproduces the report's phenomenon (2.18 %
  failures over attempts, 2.23 % per success, against the report's 2.34 % / 2.40 %); with the check
  the same images become `skipped_missing` and failures are 0; `queued` loses nothing but exceeds the
  storage limit (476 objects for a limit of 432); `lease` loses nothing to cleanup, holds the limit,
  and counts every image it gave up as `dropped_expired`. `none` loses images too but, under this load,
  not more than `inflight`: imgworker's cleaner runs between listings inside the supervisor, so the
  in-flight images it could delete are few; the origin's 18.68 % came from a cleaner running
  independently of the queue. The quick run exaggerates losses (worker start-up weighs more in a short
  run, so the backlog grows further past the retention window) and is meant for the ordering only.
- **Expiry elsewhere**: with an external cleaner, declaring `external_max_age_s` turns every
  `skipped_missing` into an explicit `dropped_expired` decided before dispatch, at a cost of a few
  points of coverage (the wait estimate is conservative); `newest_first` serves fresh images first but,
  here, analyses fewer images in all.
"""


def main() -> None:
    parts = [INTRO]
    for name, title, how, image in SECTIONS:
        path = os.path.join(RESULTS, f"{name}.md")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            table = f.read().strip()
        parts.append(f"## {title}\n\n{how}\n\n{table}\n" if how else f"## {title}\n\n{table}\n")
        if image and os.path.exists(os.path.join(RESULTS, image)):
            parts.append(f"![{name}](results/{image})\n")
    with open(os.path.join(HERE, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


if __name__ == "__main__":
    main()
