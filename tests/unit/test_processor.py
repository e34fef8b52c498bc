"""One worker step with fake collaborators: outcome classification, retries, budgets."""

from __future__ import annotations


from imgworker.algo_client import AlgoAnswer
from imgworker.config import load_config
from imgworker.errors import AlgoPermanent, AlgoTransient, ImageGone, ObjectMissing, StoreUnavailable
from imgworker.outcomes import ImageRef, Outcome, WorkItem
from imgworker.worker import ItemProcessor

ITEM = WorkItem(ref=ImageRef(key="cam/p/t/1.jpg", task_type="p", task_id="t"))


class FakeStore:
    def __init__(self, stat_errors=(), presign_errors=()):
        self.stat_errors = list(stat_errors)
        self.presign_errors = list(presign_errors)
        self.stats = 0

    def stat(self, key):
        self.stats += 1
        if self.stat_errors:
            raise self.stat_errors.pop(0)
        return 10

    def probe(self, key):
        return None

    def presign(self, key, expiry_s):
        if self.presign_errors:
            raise self.presign_errors.pop(0)
        return f"http://store/{key}?X-Amz-Signature=abc"


class FakeAlgo:
    def __init__(self, answers):
        self.answers = list(answers)
        self.requests = []
        self.endpoints = []

    def infer(self, request, endpoint=""):
        self.requests.append(request)
        self.endpoints.append(endpoint)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def ok(detections=1, success=True):
    return AlgoAnswer(success=success, detections=detections, elapsed_ms=5.0)


def run(store, algo, **worker):
    cfg = load_config(env={}, overrides={"worker": {"store_retry_budget_s": 0.5, **worker}, "algo": {"retries": 2}})
    sleeps = []
    processor = ItemProcessor(cfg, store=store, algo=algo, worker_id=7, sleep=sleeps.append)
    return processor.process(ITEM), sleeps


def test_detections_are_inferred_and_request_is_complete():
    algo = FakeAlgo([ok(3)])
    result, _ = run(FakeStore(), algo)
    assert (result.outcome, result.detections, result.algo_ms, result.worker) == (Outcome.INFERRED, 3, 5.0, 7)
    req = algo.requests[0]
    assert (req.task_type, req.task_id, req.image_path) == ("p", "t", "cam/p/t/1.jpg")
    assert req.image_url.startswith("http://store/")


def test_no_detection_and_success_false_are_not_failures():
    assert run(FakeStore(), FakeAlgo([ok(0)]))[0].outcome is Outcome.NO_DETECTION
    result, _ = run(FakeStore(), FakeAlgo([ok(2, success=False)]))
    assert (result.outcome, result.cause) == (Outcome.NO_DETECTION, "success_false")


def test_missing_at_check_is_skipped_without_algo_call():
    algo = FakeAlgo([])
    result, _ = run(FakeStore(stat_errors=[ObjectMissing("gone")]), algo)
    assert result.outcome is Outcome.SKIPPED_MISSING
    assert algo.requests == []


def test_check_off_means_no_stat_and_404_is_failed_missing_not_retried():
    store = FakeStore()
    algo = FakeAlgo([ImageGone("http_404"), ok()])
    result, _ = run(store, algo, stat_check=False)
    assert store.stats == 0
    assert (result.outcome, result.algo_calls, result.cause) == (Outcome.FAILED_MISSING, 1, "algo_404")


def test_transient_errors_retry_with_backoff_then_succeed():
    algo = FakeAlgo([AlgoTransient("http_503"), AlgoTransient("timeout"), ok(1)])
    result, sleeps = run(FakeStore(), algo)
    assert (result.outcome, result.algo_calls) == (Outcome.INFERRED, 3)
    assert len(sleeps) == 2


def test_transient_errors_exhausted_record_cause():
    algo = FakeAlgo([AlgoTransient("http_500"), AlgoTransient("malformed"), AlgoTransient("connection_error")])
    result, _ = run(FakeStore(), algo)
    assert (result.outcome, result.algo_calls, result.cause) == (Outcome.FAILED_ALGO, 3, "connection_error")


def test_permanent_error_is_not_retried():
    result, _ = run(FakeStore(), FakeAlgo([AlgoPermanent("http_422"), ok()]))
    assert (result.outcome, result.algo_calls, result.cause) == (Outcome.FAILED_ALGO, 1, "http_422")


def test_store_outage_within_budget_is_retried():
    store = FakeStore(stat_errors=[StoreUnavailable("down"), StoreUnavailable("down")])
    result, sleeps = run(store, FakeAlgo([ok()]))
    assert result.outcome is Outcome.INFERRED
    assert store.stats == 3 and len(sleeps) == 2


def test_store_outage_beyond_budget_is_failed_store():
    store = FakeStore(stat_errors=[StoreUnavailable("store unreachable: ConnectionRefusedError")] * 1000)
    processor_cfg = {"store_retry_budget_s": 0.0}
    result, _ = run(store, FakeAlgo([]), **processor_cfg)
    assert result.outcome is Outcome.FAILED_STORE
    assert result.cause == "store unreachable"


def test_retries_go_to_the_next_endpoint_and_calls_are_reported():
    cfg = load_config(env={}, overrides={"algo": {"retries": 2}})
    algo = FakeAlgo([AlgoTransient("connection_error"), ok(1)])
    processor = ItemProcessor(cfg, store=FakeStore(), algo=algo, worker_id=1, sleep=lambda s: None)
    item = WorkItem(ref=ITEM.ref, endpoints=("http://a/infer", "http://b/infer"))
    result, calls = processor.process_item(item)
    assert algo.endpoints == ["http://a/infer", "http://b/infer"]
    assert [(c.endpoint, c.healthy) for c in calls] == [("http://a/infer", False), ("http://b/infer", True)]
    assert (result.outcome, result.endpoint) == (Outcome.INFERRED, "http://b/infer")


def test_a_store_outage_during_the_call_is_waited_for_and_not_charged_to_the_service():
    from imgworker.memstore import MemoryAlgo, MemoryStore

    cfg = load_config(env={}, overrides={"algo": {"retries": 0}})
    store = MemoryStore()
    store.put(ITEM.ref.key, b"jpeg")
    first = [True]

    def fail(path):  # the store goes down while the service fetches the image
        if first.pop() if first else False:
            store.set_outage(True)
            return AlgoTransient("http_502")
        return None

    naps = []

    def sleep(seconds):
        naps.append(seconds)
        store.set_outage(False)  # the store comes back while the worker waits

    algo = MemoryAlgo(store, fail=fail)
    result, calls = ItemProcessor(cfg, store=store, algo=algo, worker_id=0, sleep=sleep).process_item(ITEM)
    assert result.outcome is Outcome.NO_DETECTION and result.algo_calls == 2
    assert naps and [c.healthy for c in calls] == [True, True]


def test_a_store_that_stays_down_after_a_failed_call_is_failed_store():
    from imgworker.memstore import MemoryAlgo, MemoryStore

    cfg = load_config(env={}, overrides={"algo": {"retries": 2}, "worker": {"store_retry_budget_s": 0.0}})
    store = MemoryStore()
    store.put(ITEM.ref.key, b"jpeg")

    def fail(path):
        store.set_outage(True)
        return AlgoTransient("http_502")

    algo = MemoryAlgo(store, fail=fail)
    result = ItemProcessor(cfg, store=store, algo=algo, worker_id=0, sleep=lambda s: None).process(ITEM)
    assert (result.outcome, result.cause, result.algo_calls) == (Outcome.FAILED_STORE, "store_unavailable", 1)


def test_an_image_deleted_during_a_failed_call_is_failed_missing():
    from imgworker.memstore import MemoryAlgo, MemoryStore

    cfg = load_config(env={}, overrides={"algo": {"retries": 2}})
    store = MemoryStore()
    store.put(ITEM.ref.key, b"jpeg")

    def fail(path):
        store.delete([path])
        return AlgoTransient("timeout")

    algo = MemoryAlgo(store, fail=fail)
    result = ItemProcessor(cfg, store=store, algo=algo, worker_id=0, sleep=lambda s: None).process(ITEM)
    assert (result.outcome, result.cause, result.algo_calls) == (Outcome.FAILED_MISSING, "object_missing", 1)
