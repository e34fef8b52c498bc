"""The in-memory store and algorithm service: the Store interface, its errors and faults, and one worker step."""

from __future__ import annotations

import threading

import pytest

from imgworker.algo_client import AlgoRequest
from imgworker.config import load_config
from imgworker.errors import AlgoTransient, ExitCode, ImageGone, ObjectMissing, StoreFatal, StoreUnavailable
from imgworker.memstore import MemoryAlgo, MemoryStore
from imgworker.outcomes import ImageRef, Outcome, WorkItem
from imgworker.worker import ItemProcessor


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def filled(*keys: str, **kwargs) -> MemoryStore:
    store = MemoryStore(**kwargs)
    for key in keys:
        store.put(key, key.encode())
    return store


def keys_of(pages: list[list[ImageRef]]) -> list[list[str]]:
    return [[ref.key for ref in page] for page in pages]


def request_for(store: MemoryStore, key: str) -> AlgoRequest:
    return AlgoRequest(image_url=store.presign(key, 60), task_id="t", task_type="p", image_path=key)


# -- MemoryStore ----------------------------------------------------------------------------------


def test_put_then_stat_gives_size_and_mtime_comes_from_the_clock():
    store = MemoryStore("bkt", clock=Clock(1000.0))
    store.put("a.jpg", b"12345")
    store.put("b.jpg", b"")
    assert store.bucket == "bkt"
    assert (store.stat("a.jpg"), store.stat("b.jpg")) == (5, 0)
    refs = next(store.list_pages("", 10))
    assert refs == [ImageRef(key="a.jpg", size=5, mtime=1001.0), ImageRef(key="b.jpg", size=0, mtime=1002.0)]
    assert all(ref.task_type == "" and ref.task_id == "" for ref in refs)


def test_list_pages_are_lexicographic_sized_and_filtered_by_prefix():
    store = filled("cam/b/2.jpg", "cam/a/1.jpg", "other/x.jpg", "cam/a/10.jpg", "cam/c/3.jpg", "cam")
    pages = list(store.list_pages("cam/", 2))
    assert keys_of(pages) == [["cam/a/1.jpg", "cam/a/10.jpg"], ["cam/b/2.jpg", "cam/c/3.jpg"]]
    assert keys_of(list(store.list_pages("", 4))) == [
        ["cam", "cam/a/1.jpg", "cam/a/10.jpg", "cam/b/2.jpg"],
        ["cam/c/3.jpg", "other/x.jpg"],
    ]
    assert list(store.list_pages("nothing/", 3)) == []
    assert store.calls["list_pages"] == 3


def test_list_pages_continue_after_the_last_key_like_s3():
    store = filled("k1", "k2", "k3", "k4")
    pages = store.list_pages("", 2)
    assert [r.key for r in next(pages)] == ["k1", "k2"]
    store.delete(["k3"])
    store.put("k25", b"x")
    store.put("k0", b"x")  # before the continuation point: not seen in this listing
    assert keys_of(list(pages)) == [["k25", "k4"]]


def test_presign_and_resolve_round_trip_and_gone_object_resolves_to_none():
    store = filled("cam/a b/ü?.jpg", bucket="imgs")
    url = store.presign("cam/a b/ü?.jpg", 900)
    assert url.startswith("mem://imgs/cam/a%20b/%C3%BC%3F.jpg?X-Amz-Expires=900&X-Amz-Signature=")
    assert url == store.presign("cam/a b/ü?.jpg", 900)  # deterministic
    assert store.resolve(url) == "cam/a b/ü?.jpg".encode()
    store.delete(["cam/a b/ü?.jpg"])
    assert store.resolve(url) is None


def test_resolve_rejects_urls_it_did_not_sign():
    store = filled("a.jpg")
    url = store.presign("a.jpg", 60)
    with pytest.raises(ValueError):
        store.resolve(url.replace("X-Amz-Expires=60", "X-Amz-Expires=61"))
    with pytest.raises(ValueError):
        store.resolve(url.replace("mem://images", "mem://elsewhere"))
    with pytest.raises(ValueError):
        store.resolve("mem://images/a.jpg")


def test_missing_key_raises_object_missing():
    store = MemoryStore()
    with pytest.raises(ObjectMissing):
        store.stat("gone.jpg")
    with pytest.raises(ObjectMissing):
        store.copy("gone.jpg", "alerts/gone.jpg")
    assert store.keys() == []


def test_copy_duplicates_data_and_keeps_the_source():
    store = filled("a.jpg")
    store.copy("a.jpg", "alerts/a.jpg")
    assert store.keys() == ["a.jpg", "alerts/a.jpg"]
    assert store.stat("alerts/a.jpg") == store.stat("a.jpg")


URL_OF_A = MemoryStore().presign("a.jpg", 60)
OUTAGE_CALLS = {
    "stat": lambda s: s.stat("a.jpg"),
    "presign": lambda s: s.presign("a.jpg", 60),
    "put": lambda s: s.put("b.jpg", b"x"),
    "copy": lambda s: s.copy("a.jpg", "c.jpg"),
    "delete": lambda s: s.delete(["a.jpg"]),
    "list_pages": lambda s: list(s.list_pages("", 10)),
    "resolve": lambda s: s.resolve(URL_OF_A),
}


@pytest.mark.parametrize("method", sorted(OUTAGE_CALLS))
def test_outage_makes_every_call_unavailable_and_changes_nothing(method):
    store = filled("a.jpg")
    before = store.calls[method]
    store.set_outage(True)
    with pytest.raises(StoreUnavailable, match=r"^store unreachable: "):
        OUTAGE_CALLS[method](store)
    assert store.calls[method] == before + 1
    assert store.keys() == ["a.jpg"] and store.deletes == []
    store.set_outage(False)
    OUTAGE_CALLS[method](store)


def test_outage_mid_listing_raises_on_the_next_page():
    store = filled("k1", "k2", "k3")
    pages = store.list_pages("", 2)
    next(pages)
    store.set_outage(True)
    with pytest.raises(StoreUnavailable):
        next(pages)


def test_check_is_fatal_during_an_outage():
    store = MemoryStore()
    store.check()
    store.set_outage(True)
    with pytest.raises(StoreFatal) as info:
        store.check()
    assert info.value.exit_code is ExitCode.STORE_UNREACHABLE
    assert store.calls["check"] == 2


def test_delete_records_keys_in_order_and_absent_keys_are_not_refused():
    store = filled("a", "b", "c")
    assert store.delete(iter(["c", "nope", "a"])) == []
    assert store.keys() == ["b"]
    assert store.deletes == ["c", "nope", "a"]
    assert store.calls["delete"] == 1


def test_refused_deletes_are_returned_and_kept():
    store = filled("a", "b", "c")
    store.refuse_deletes({"b", "zzz"})
    assert store.delete(["a", "b", "zzz", "c"]) == ["b", "zzz"]
    assert store.keys() == ["b"]
    assert store.deletes == ["a", "c"]
    store.refuse_deletes(set())
    assert store.delete(["b"]) == [] and store.keys() == []


def test_touch_sets_mtime_for_retention_tests():
    store = filled("a")
    store.touch("a", 5.0)
    assert next(store.list_pages("", 1))[0].mtime == 5.0
    with pytest.raises(ObjectMissing):
        store.touch("gone", 5.0)


def test_concurrent_puts_and_deletes_stay_consistent():
    store = MemoryStore()
    threads_n, per_thread = 8, 200

    def churn(t: int) -> None:
        mine = [f"t{t}/{i:04d}" for i in range(per_thread)]
        for key in mine:
            store.put(key, b"x")
        store.delete(mine[::2])  # keep the odd ones
        for key in mine[1::2]:
            store.stat(key)

    threads = [threading.Thread(target=churn, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert len(store) == threads_n * per_thread // 2
    assert len(store.deletes) == threads_n * per_thread // 2
    assert store.calls["put"] == threads_n * per_thread
    listed = [ref.key for page in store.list_pages("", 37) for ref in page]
    assert listed == store.keys() and len(listed) == len(store)


# -- MemoryAlgo -----------------------------------------------------------------------------------


def test_algo_counts_every_call_and_answers_with_the_detection_callable():
    store = filled("a.jpg", "b.jpg")
    algo = MemoryAlgo(store, detections=lambda path: 3 if path == "a.jpg" else 0)
    assert algo.infer(request_for(store, "a.jpg"), "http://e1").detections == 3
    answer = algo.infer(request_for(store, "b.jpg"), "http://e2")
    assert (answer.success, answer.detections, answer.elapsed_ms) == (True, 0, 0.0)
    algo.infer(request_for(store, "a.jpg"), "http://e1")
    assert algo.calls == {"a.jpg": 2, "b.jpg": 1}
    assert algo.endpoints == {"http://e1": 2, "http://e2": 1}
    assert store.calls["resolve"] == 3


def test_algo_gone_image_is_a_404_and_still_counted():
    store = MemoryStore()
    algo = MemoryAlgo(store)
    with pytest.raises(ImageGone) as info:
        algo.infer(request_for(store, "gone.jpg"))
    assert info.value.cause == "http_404"
    assert algo.calls["gone.jpg"] == 1


def test_algo_down_endpoint_is_transient_and_others_still_answer():
    store = filled("a.jpg")
    algo = MemoryAlgo(store)
    algo.down.add("http://dead")
    with pytest.raises(AlgoTransient) as info:
        algo.infer(request_for(store, "a.jpg"), "http://dead")
    assert info.value.cause == "connection_error"
    assert algo.infer(request_for(store, "a.jpg"), "http://alive").success
    assert algo.endpoints == {"http://dead": 1, "http://alive": 1}


def test_algo_store_outage_is_a_502():
    store = filled("a.jpg")
    algo = MemoryAlgo(store)
    request = request_for(store, "a.jpg")
    store.set_outage(True)
    with pytest.raises(AlgoTransient) as info:
        algo.infer(request)
    assert info.value.cause == "http_502"


def test_algo_fail_hook_raises_whatever_the_test_wants():
    store = filled("bad.jpg", "ok.jpg")
    algo = MemoryAlgo(store, fail=lambda path: RuntimeError("bug") if path == "bad.jpg" else None)
    with pytest.raises(RuntimeError, match="bug"):
        algo.infer(request_for(store, "bad.jpg"))
    assert algo.infer(request_for(store, "ok.jpg")).success
    assert algo.calls == {"bad.jpg": 1, "ok.jpg": 1}


# -- one worker step over both --------------------------------------------------------------------


def process(store: MemoryStore, algo: MemoryAlgo, key: str) -> Outcome:
    cfg = load_config(env={}, overrides={})
    processor = ItemProcessor(cfg, store=store, algo=algo, worker_id=0, sleep=lambda s: None)
    return processor.process(WorkItem(ref=ImageRef(key=key, task_type="p", task_id="t"))).outcome


def test_item_processor_end_to_end_over_memory():
    store = filled("cam/p/t/hit.jpg", "cam/p/t/miss.jpg")
    algo = MemoryAlgo(store, detections=lambda path: 2 if path.endswith("hit.jpg") else 0)
    assert process(store, algo, "cam/p/t/hit.jpg") is Outcome.INFERRED
    assert process(store, algo, "cam/p/t/miss.jpg") is Outcome.NO_DETECTION
    assert process(store, algo, "cam/p/t/gone.jpg") is Outcome.SKIPPED_MISSING
    assert algo.calls == {"cam/p/t/hit.jpg": 1, "cam/p/t/miss.jpg": 1}
    assert store.calls["stat"] == 3 and store.calls["presign"] == 2


def test_item_processor_image_deleted_after_stat_is_failed_missing():
    store = filled("cam/p/t/a.jpg")
    real_presign = store.presign

    def presign_then_vanish(key: str, expiry_s: int) -> str:
        url = real_presign(key, expiry_s)
        store.delete([key])  # the cleaner wins the race between stat and the algorithm's fetch
        return url

    store.presign = presign_then_vanish  # type: ignore[method-assign]
    algo = MemoryAlgo(store)
    assert process(store, algo, "cam/p/t/a.jpg") is Outcome.FAILED_MISSING
    assert algo.calls == {"cam/p/t/a.jpg": 1}
