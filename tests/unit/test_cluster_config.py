"""``[cluster]``: off by default, validated at load, secrets never shown; ``/metrics`` labelled by host."""

from __future__ import annotations

import pytest
from prometheus_client.core import CounterMetricFamily

from imgworker.config import load_config
from imgworker.errors import ConfigError
from imgworker.metrics import HostLabelled


def test_cluster_mode_is_off_without_a_url():
    assert not load_config(env={}).cluster.enabled


def test_cluster_settings_come_from_the_environment():
    cfg = load_config(env={"IMGWORKER_CLUSTER_URL": "nats://a:4222,nats://b:4222", "IMGWORKER_CLUSTER_ACK_WAIT_S": "5",
                           "IMGWORKER_CLUSTER_HOST": "gpu-7"})
    assert cfg.cluster.enabled and cfg.cluster.ack_wait_s == 5.0 and cfg.cluster.host == "gpu-7"


@pytest.mark.parametrize("overrides, named", [
    ({"cluster": {"url": "http://nats:4222"}}, "cluster.url"),
    ({"cluster": {"url": "nats://n:4222", "ack_wait_s": 0.5}}, "cluster.ack_wait_s"),
    ({"cluster": {"url": "nats://n:4222", "credentials_file": "/nonexistent.creds"}}, "cluster.credentials_file"),
    ({"cluster": {"url": "nats://n:4222"}, "retention": {"enabled": True, "max_count": 5, "protect": "none"}},
     "retention.protect"),
    ({"cluster": {"url": "nats://n:4222"}, "scan": {"mode": "events", "events": {"filer": "h:1.2"}}},
     "scan.events.source"),
])
def test_cluster_settings_are_refused_with_the_key_named(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(env={}, overrides=overrides)


def test_a_password_in_the_cluster_url_is_never_shown():
    cfg = load_config(env={}, overrides={"cluster": {"url": "nats://user:s3cret@n1:4222,nats://n2:4222"}})
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.cluster) and "n2:4222" in repr(cfg.cluster)


def test_every_sample_gets_the_host_label():
    class One:
        def collect(self):
            yield CounterMetricFamily("imgworker_x", "x", value=3)

    [metric] = list(HostLabelled(One(), "gpu-7").collect())
    assert {s.labels["host"] for s in metric.samples} == {"gpu-7"}


def test_the_cluster_report_says_it_is_built_from_the_ledger(monkeypatch):
    import msgspec

    from imgworker.cluster import report as cluster
    from imgworker.cluster.host import LedgerEntry
    from imgworker.stats import format_report

    entry = LedgerEntry(key="cam/a.jpg", outcome="inferred", host="h1", started_at=1.0, finished_at=2.0)
    figures = {"stream_messages": 0, "consumer_pending": 0, "consumer_ack_pending": 0, "consumer_redelivered": 0}
    monkeypatch.setattr(cluster, "read_cluster", lambda cfg: ([msgspec.json.encode(entry)], figures))
    report, hosts, _ = cluster.cluster_report(load_config(env={"IMGWORKER_CLUSTER_URL": "nats://x:4222"}).cluster)
    text = format_report(report)
    assert hosts == {"h1": 1}
    assert "figures of: the cluster's outcome ledger" in text
    assert "results file" not in text, "the ledger is not a results file"


def test_a_cluster_hosts_metrics_endpoint_labels_every_series_with_the_host():
    import urllib.request

    from imgworker.metrics import serve_metrics

    class One:
        def collect(self):
            yield CounterMetricFamily("imgworker_x", "x", value=3)

    server = serve_metrics(lambda: None, 0, host="gpu-7", extra=[One()])
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'imgworker_x_total{host="gpu-7"} 3.0' in text
