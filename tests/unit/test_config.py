from __future__ import annotations

import os

import pytest

from imgworker.config import load_config
from imgworker.errors import ConfigError


def test_defaults_are_valid():
    cfg = load_config(env={})
    assert cfg.worker.count == 4
    assert cfg.worker.stat_timeout_s == 2.0
    assert cfg.worker.presign_expiry_s == 900
    assert cfg.dispatch.overflow == "block"


def test_precedence_file_then_env_then_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[worker]\ncount = 2\nstat_check = false\n[store]\nbucket = "from-file"\nprefix = "cam/"\n')
    env = {"IMGWORKER_WORKER_COUNT": "5", "IMGWORKER_STORE_BUCKET": "from-env"}
    cfg = load_config(path=str(path), env=env, overrides={"worker": {"count": 9}})
    assert cfg.worker.count == 9
    assert cfg.store.bucket == "from-env"
    assert cfg.store.prefix == "cam/"
    assert cfg.worker.stat_check is False


def test_env_lists_and_tables():
    env = {"IMGWORKER_SCAN_EXTENSIONS": ".jpg, .PNG", "IMGWORKER_ALGO_ALGO_CONFIG": '{"threshold": 0.5}'}
    cfg = load_config(env=env)
    assert cfg.scan.extensions == (".jpg", ".PNG")
    assert cfg.algo.algo_config == {"threshold": 0.5}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"worker": {"count": 0}}, "invalid config key worker.count: value 0 is not allowed (Expected `int` >= 1)"),
        ({"dispatch": {"overflow": "sometimes"}},
         "invalid config key dispatch.overflow: value 'sometimes' is not allowed (one of block, drop_oldest, drop_newest)"),
        ({"algo": {"timeout_s": "soon"}}, "invalid config key algo.timeout_s: value 'soon' is not allowed"),
        ({"algo": {"endpoint": "ftp://x"}}, "invalid config key algo.endpoint: value 'ftp://x' is not allowed"),
        ({"store": {"endpoint": "http://minio:9000"}}, "invalid config key store.endpoint"),
        ({"worker": {"thread_count": 3}}, "unknown field `thread_count` in [worker]"),
        ({"worker": {"threads": 0}}, "invalid config key worker.threads: value 0 is not allowed"),
    ],
)
def test_invalid_values_name_key_value_and_allowed(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(env={}, overrides=overrides)
    assert expected in str(err.value)


def test_bad_env_value_is_named():
    with pytest.raises(ConfigError, match=r"worker.count: value 'many'"):
        load_config(env={"IMGWORKER_WORKER_COUNT": "many"})


def test_credentials_from_env_and_never_in_repr():
    cfg = load_config(env={"AWS_ACCESS_KEY_ID": "AKIA-x", "AWS_SECRET_ACCESS_KEY": "hunter2-secret"})
    assert cfg.credentials.secret_key == "hunter2-secret"
    assert "hunter2" not in repr(cfg)
    assert "hunter2" not in str(cfg.credentials)


def test_imgworker_credentials_win_over_aws(tmp_path):
    env = {"AWS_SECRET_ACCESS_KEY": "aws", "IMGWORKER_SECRET_KEY": "mine", "IMGWORKER_ACCESS_KEY": "k"}
    assert load_config(env=env).credentials.secret_key == "mine"


def test_credentials_file(tmp_path):
    creds = tmp_path / "creds.toml"
    creds.write_text('access_key = "a"\nsecret_key = "b"\n')
    cfg = load_config(env={"IMGWORKER_SECRET_KEY": "ignored"}, overrides={"store": {"credentials_file": str(creds)}})
    assert (cfg.credentials.access_key, cfg.credentials.secret_key) == ("a", "b")


def test_secret_in_main_config_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[store]\nsecret_key = "x"\n')
    with pytest.raises(ConfigError, match="store.secret_key is not allowed"):
        load_config(path=str(path), env={})


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(path=str(tmp_path / "nope.toml"), env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[worker\ncount=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path=str(bad), env={})


def test_config_is_immutable():
    cfg = load_config(env={})
    with pytest.raises(AttributeError):
        cfg.worker.count = 3  # type: ignore[misc]


def test_public_endpoint_signs_urls_for_the_algorithm_service_without_network():
    from imgworker.store import Store

    cfg = load_config(env={}, overrides={"store": {"endpoint": "127.0.0.1:1", "public_endpoint": "images.example:9000",
                                                   "bucket": "bkt"}})
    from imgworker.config import Credentials

    url = Store(cfg.store, Credentials("k", "s")).presign("a b/中文 %+#.jpg", 900)
    assert url.startswith("http://images.example:9000/bkt/a%20b/")
    assert "X-Amz-Expires=900" in url


def test_retention_needs_a_rule_and_routes_need_urls():
    with pytest.raises(ConfigError, match="retention.enabled"):
        load_config(env={}, overrides={"retention": {"enabled": True}})
    with pytest.raises(ConfigError, match="algo.routes.car: value 'x'"):
        load_config(env={}, overrides={"algo": {"routes": {"car": ["x"]}}})
    with pytest.raises(ConfigError, match="retention.protect: value 'all' is not allowed .one of none, inflight"):
        load_config(env={}, overrides={"retention": {"protect": "all"}})


@pytest.mark.parametrize(
    ("actions", "scan", "expected"),
    [
        ({"copy_alerts": True, "alerts_prefix": "myalerts/"}, {},
         "invalid config key actions.alerts_prefix: value 'myalerts/' is not allowed (it must start with one of "
         "scan.exclude_prefixes ['alerts/', 'results/'], or the copies would be analysed again)"),
        ({"write_results": True, "results_prefix": "out/"}, {"exclude_prefixes": ["alerts/"]},
         "invalid config key actions.results_prefix: value 'out/' is not allowed (it must start with one of "
         "scan.exclude_prefixes ['alerts/'], or the copies would be analysed again)"),
        ({"copy_alerts": True}, {"exclude_prefixes": []},
         "invalid config key actions.alerts_prefix: value 'alerts/' is not allowed"),
        ({"copy_alerts": True, "alerts_prefix": ""}, {},
         "invalid config key actions.alerts_prefix: value '' is not allowed while the action is on"),
        ({"write_results": True, "results_prefix": ""}, {},
         "invalid config key actions.results_prefix: value '' is not allowed while the action is on"),
    ],
)
def test_action_prefixes_must_be_excluded_from_the_scan(actions, scan, expected):
    with pytest.raises(ConfigError) as err:
        load_config(env={}, overrides={"actions": actions, "scan": scan})
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("actions", "scan"),
    [
        ({"copy_alerts": True, "write_results": True}, {}),
        ({"copy_alerts": True, "alerts_prefix": "alerts/cam-7/"}, {}),
        ({"copy_alerts": True, "alerts_prefix": "myalerts/"}, {"exclude_prefixes": ["myalerts/"]}),
        ({"copy_alerts": False, "alerts_prefix": "myalerts/", "results_prefix": ""}, {}),
    ],
)
def test_action_prefixes_below_an_excluded_prefix_or_unused_are_accepted(actions, scan):
    cfg = load_config(env={}, overrides={"actions": actions, "scan": scan})
    assert cfg.actions.alerts_prefix == actions.get("alerts_prefix", "alerts/")


def test_a_missing_or_unreadable_algo_ca_bundle_is_refused_at_load(tmp_path):
    missing = tmp_path / "gone.pem"
    with pytest.raises(ConfigError) as err:
        load_config(env={}, overrides={"algo": {"ca_bundle": str(missing)}})
    assert str(err.value) == f"invalid config key algo.ca_bundle: file {str(missing)!r} does not exist"
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)  # there, but not a file requests can read certificates from
    with pytest.raises(ConfigError, match="algo.ca_bundle: file .* cannot be read"):
        load_config(env={}, overrides={"algo": {"ca_bundle": str(fifo)}})
    bundle = tmp_path / "ca.pem"
    bundle.write_text("pem")
    assert load_config(env={}, overrides={"algo": {"ca_bundle": str(bundle)}}).algo.ca_bundle == str(bundle)
