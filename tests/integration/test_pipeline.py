"""The whole pipeline against a real SeaweedFS and a real HTTP algorithm service."""

from __future__ import annotations


import pytest

from imgworker.ledger import ProcessedSet
from imgworker.services.loadgen import photo_frames
from imgworker.services.algo_server import AlgoService
from imgworker.supervisor import Supervisor
from tests.support.driving import reach
from tests.support.results import read_outcomes
from tests.support.store import upload

pytestmark = pytest.mark.timeout(120)


def odd_keys(prefix: str) -> list[str]:
    long_dir = "/".join(["d" * 200] * 4)
    return [
        f"{prefix}person/cam-1/20240101-120000.001.jpg",
        f"{prefix}person/cam 2/20240101-120000.002.jpg",
        f"{prefix}人员/任务 1/20240101-120000.003.jpg",
        f"{prefix}vehicle/cam%41+b#c/20240101-120000.004.jpg",
        f"{prefix}a+b %20 c#d.jpeg",
        f"{prefix}{long_dir}/" + "x" * (1024 - len(prefix) - len(long_dir) - 5) + ".png",
    ]


def test_every_image_ends_in_exactly_one_outcome(make_config, store, prefix):
    cfg = make_config()
    images = odd_keys(prefix)
    assert len(images[-1].encode()) == 1024
    upload(store, images)
    upload(store, [f"{prefix}zero/t/20240101-120000.000.jpg"], b"")
    upload(store, [f"{prefix}text/t/20240101-120000.000.jpg"], b"not an image at all")
    upload(store, [f"{prefix}person/cam-1/preview_1.jpg", f"{prefix}person/cam-1/meta.json",
                   f"{prefix}alerts/person/x.jpg"])
    report = Supervisor(cfg, show_progress=False).run()

    expected = set(images) | {f"{prefix}zero/t/20240101-120000.000.jpg", f"{prefix}text/t/20240101-120000.000.jpg"}
    outcomes = read_outcomes(cfg)
    assert set(outcomes) == expected
    assert all(len(v) == 1 for v in outcomes.values())
    assert report.scanned == len(expected)
    assert report.conserved
    assert report.failures == 0  # presigned URLs worked for every odd key
    assert report.outcomes["inferred"] + report.outcomes["no_detection"] == len(expected)
    assert report.pending == report.in_flight == 0


def test_task_fields_reach_the_results(make_config, store, prefix):
    cfg = make_config()
    upload(store, [f"{prefix}人员/任务 1/20240101-120000.003.jpg"])
    Supervisor(cfg, show_progress=False).run()
    from imgworker.results import read_results

    (result,) = list(read_results(cfg.results_path))
    assert (result.task_type, result.task_id) == ("人员", "任务 1")
    assert result.algo_ms is not None and result.algo_ms >= 20.0
    assert result.e2e_ms >= result.algo_ms
    assert result.worker in (0, 1, 2)


@pytest.mark.parametrize(("check", "outcome"), [(True, "skipped_missing"), (False, "failed_missing")])
def test_image_deleted_while_queued(make_config, store, prefix, check, outcome):
    cfg = make_config(worker={"count": 1, "stat_check": check})
    keys = [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(6)]
    upload(store, keys)
    sup = Supervisor(cfg, show_progress=False)
    with sup.running():
        while sup.dispatch.pending < len(keys):
            sup.intake_step()
        store.delete(keys[3:])
        reach(sup, sup.finished, "the run's end")
    report = sup.report()
    outcomes = read_outcomes(cfg)
    assert {k: v[0] for k, v in outcomes.items() if k in keys[3:]} == {k: outcome for k in keys[3:]}
    assert report.outcomes[outcome] == 3
    assert report.conserved and report.scanned == 6
    if not check:
        assert report.failures == 3 and report.failure_rate == pytest.approx(0.5)


def test_restart_does_not_analyse_again_and_prunes_deleted(make_config, store, prefix):
    cfg = make_config()
    first = [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(5)]
    upload(store, first)
    assert Supervisor(cfg, show_progress=False).run().scanned == 5
    later = [f"{prefix}p/t/20240101-120001.{i:03d}.jpg" for i in range(3)]
    upload(store, later)
    store.delete(first[:2])
    report = Supervisor(cfg, show_progress=False).run()
    assert report.scanned == 3
    outcomes = read_outcomes(cfg)
    assert sorted(outcomes) == sorted(first + later)
    assert all(len(v) == 1 for v in outcomes.values())
    loaded = ProcessedSet()
    loaded.load(f"{cfg.run.state_dir}/state.json")
    processed = {k for k in first + later if loaded.contains(k)}
    assert processed == set(first[2:] + later) and loaded.size() == len(processed)  # deleted objects pruned


def test_drop_oldest_counts_every_drop(make_config, store, prefix):
    cfg = make_config(worker={"count": 1}, dispatch={"queue_capacity": 2, "overflow": "drop_oldest"})
    upload(store, [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(10)])
    report = Supervisor(cfg, show_progress=False).run()
    assert report.scanned == 10 and report.conserved
    assert report.outcomes["dropped_backlog"] >= 7
    assert sum(report.outcomes.values()) == 10


def test_block_overflow_loses_nothing(make_config, store, prefix):
    cfg = make_config(worker={"count": 2}, dispatch={"queue_capacity": 2, "overflow": "block"})
    upload(store, [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(12)])
    report = Supervisor(cfg, show_progress=False).run()
    assert report.scanned == 12 and report.conserved
    assert report.outcomes["dropped_backlog"] == 0
    assert report.inferences == 12


@pytest.mark.timeout(180)
def test_face_backend_detects_faces_and_rejects_non_images(make_config, store, prefix):
    with AlgoService("face") as face:
        cfg = make_config(algo={"endpoint": face.endpoint, "retries": 0})
        from skimage import data

        from imgworker.services.loadgen import jpeg

        upload(store, [f"{prefix}person/t/20240101-120000.001.jpg"], jpeg(data.astronaut()))
        upload(store, [f"{prefix}person/t/20240101-120000.002.jpg"], jpeg(data.coffee()))
        upload(store, [f"{prefix}person/t/20240101-120000.003.jpg"], b"plain text, not a JPEG")
        upload(store, [f"{prefix}person/t/20240101-120000.004.jpg"], b"")
        report = Supervisor(cfg, show_progress=False).run()
    outcomes = {k.rsplit("/", 1)[-1]: v[0] for k, v in read_outcomes(cfg).items()}
    assert outcomes == {
        "20240101-120000.001.jpg": "inferred",
        "20240101-120000.002.jpg": "no_detection",
        "20240101-120000.003.jpg": "failed_algo",
        "20240101-120000.004.jpg": "failed_algo",
    }
    assert report.conserved
    assert len(photo_frames()) >= 4


@pytest.mark.timeout(120)
def test_incremental_reconciliation_against_the_real_store(make_config, store, prefix):
    cfg = make_config(scan={"reconcile": "incremental"})
    first = [f"{prefix}person/t{n}/20240101-120000.{i:03d}.jpg" for n in (1, 2) for i in range(4)]
    upload(store, first)
    Supervisor(cfg, show_progress=False).run()
    later = [f"{prefix}person/t1/20240101-120001.{i:03d}.jpg" for i in range(3)]
    upload(store, later)
    sup = Supervisor(cfg, show_progress=False)
    report = sup.run()
    assert report.scanned == 3
    # a checkpoint passes only keys that had their outcome when listed: how far depends on timing
    assert first[3] <= sup.intake.checkpoints["person/t1"] <= later[-1]  # first[3]: t1's last key before
    assert sup.intake.checkpoints["person/t2"] == first[-1]
    third = Supervisor(cfg, show_progress=False)
    assert third.run().scanned == 0
    assert third.intake.checkpoints == {"person/t1": later[-1], "person/t2": first[-1]}
    outcomes = read_outcomes(cfg)
    assert sorted(outcomes) == sorted(first + later) and all(len(v) == 1 for v in outcomes.values())
