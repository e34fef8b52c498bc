"""What the report says where figures are missing, and what a success=false answer leaves in its line."""

from __future__ import annotations

import msgspec

from imgworker.algo_client import decode_answer, error_text
from imgworker.outcomes import Outcome, Result
from imgworker.stats import Stats, format_report


def test_a_success_false_answer_keeps_its_error_without_a_presigned_signature():
    body = msgspec.json.encode({"success": False, "error": "CUDA out of memory\nfetching http://s3:9000/b/k.jpg"
                                "?X-Amz-Signature=abc123&X-Amz-Credential=AK%2F"})
    answer = decode_answer(body, 5.0)
    assert answer.error == "CUDA out of memory fetching http://s3:9000/b/k.jpg?…"
    assert len(error_text("x" * 500)) == 200 and error_text(None) == ""


def report_with(share: float | None, **results: int):
    stats = Stats(4, processes=2)
    for outcome, n in results.items():
        for i in range(n):
            stats.record(Result(key=f"{outcome}-{i}", outcome=Outcome(outcome), algo_calls=3, e2e_ms=5.0))
    stats.scanned = stats.finished
    if share is not None:
        stats.observed_s, stats.starved_s = 100.0, share * 100.0
    return stats.report(pending=0, in_flight=0, wall_s=10.0)


def test_an_input_bound_run_says_its_throughput_is_the_arrival_rate():
    text = format_report(report_with(0.97, no_detection=2))
    assert "| input-bound | yes: lanes waited for images 97% of the time with the queue empty; the throughput is " \
           "the rate images arrived, not what the lanes can do" in text
    text = format_report(report_with(0.3, no_detection=2))
    assert "| input-bound | no: lanes waited for images 30% of the time |" in text


def test_http_retries_are_counted_apart_from_re_dispatches():
    report = report_with(None, failed_algo=2)
    assert (report.http_retries, report.retries) == (4, 0)
    text = format_report(report)
    assert "| HTTP retries (calls beyond an image's first) | 4 |" in text
    assert "| re-dispatches (process died, or waited for an endpoint) | 0 |" in text
    assert "| p50 / p95 / p99 inference | n/a |" in text and "| mean inference time | n/a |" in text
    assert "| p50 / p99 discovery (upload to dispatch) | n/a |" in text


def test_the_share_of_time_lanes_waited_for_images_follows_the_queue(tmp_path):
    import itertools

    from imgworker.memstore import MemoryAlgo, MemoryStore
    from tests.support.memory import config, fill, supervisor

    shares = []
    for n, count in [(2, 4), (60, 1)]:  # lanes to spare; a queue that never runs dry until the end
        cfg = config(tmp_path / str(n), worker={"count": count})
        store = MemoryStore()
        fill(store, ["p/a"], n)
        ticks = itertools.count()
        report = supervisor(cfg, store, MemoryAlgo(store), clock=lambda: next(ticks) * 0.01).run()
        assert report.conserved
        shares.append(report.input_starved_share)
    assert shares[0] is not None and shares[0] > 0.5
    assert shares[1] is not None and shares[1] < 0.1


def test_with_nothing_attempted_the_rates_read_n_a_not_zero():
    text = format_report(report_with(None, skipped_missing=2))
    assert "| failure rate | n/a of 0 attempted |" in text
    assert "| success rate | n/a |" in text


def test_a_readmitted_image_analysed_again_no_longer_awaits_its_retry():
    from imgworker.results import Retried
    from imgworker.stats import stats_from_results

    first = Result(key="a", outcome=Outcome.FAILED_ALGO, finished_at=1.0)
    again = Result(key="a", outcome=Outcome.NO_DETECTION, finished_at=2.0)
    waiting = stats_from_results([first, Retried(retried="a")]).report(pending=0, in_flight=0, wall_s=1.0)
    assert (waiting.awaiting_retry, waiting.readmitted) == (1, 1)
    assert "re-admitted, not analysed since (counted by their earlier outcome): 1" in format_report(waiting)
    done = stats_from_results([first, Retried(retried="a"), again]).report(pending=0, in_flight=0, wall_s=1.0)
    assert (done.awaiting_retry, done.duplicates, done.conserved) == (0, 0, True)
    assert "not analysed since" not in format_report(done)


def test_a_report_rebuilt_from_results_says_n_a_for_what_only_a_run_knows():
    from imgworker.stats import stats_from_results

    results = [Result(key=f"k{i}", outcome=Outcome.NO_DETECTION, algo_calls=1, e2e_ms=5.0) for i in range(3)]
    rebuilt = stats_from_results(results)
    text = format_report(rebuilt.report(pending=0, in_flight=0, wall_s=1.0))
    assert "| re-dispatches (process died, or waited for an endpoint) | n/a (not in the results) |" in text
    assert "| worker restarts (backed off) / recycles / deadline kills | n/a (not in the results) |" in text
    live = format_report(report_with(None, no_detection=1))
    assert "| worker restarts (backed off) / recycles / deadline kills | 0 (0) / 0 / 0 |" in live
