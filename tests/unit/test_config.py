from __future__ import annotations

import logging
import os

import pytest

from imgworker.config import EventsConfig, load_config
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
        ({"worker": {"count": 0}}, "invalid config key worker.count: value 0 is not allowed (a whole number >= 1)"),
        ({"dispatch": {"overflow": "sometimes"}},
         "invalid config key dispatch.overflow: value 'sometimes' is not allowed (one of block, drop_oldest, drop_newest)"),
        ({"algo": {"timeout_s": "soon"}}, "invalid config key algo.timeout_s: value 'soon' is not allowed"),
        ({"algo": {"endpoint": "ftp://x"}}, "invalid config key algo.endpoint: value 'ftp://x' is not allowed"),
        ({"store": {"endpoint": "http://minio:9000"}}, "invalid config key store.endpoint"),
        ({"worker": {"thread_count": 3}}, "unknown config key worker.thread_count in [worker]: did you mean `threads`?"),
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


def test_an_env_variable_naming_no_section_is_refused_with_the_nearest_name():
    # A misspelt section in a variable would otherwise be ignored without a word.
    with pytest.raises(ConfigError,
                       match=r"IMGWORKER_WORKR_COUNT names no config key.*did you mean IMGWORKER_WORKER_COUNT\?"):
        load_config(env={"IMGWORKER_WORKR_COUNT": "2"})
    cfg = load_config(env={"IMGWORKER_ACCESS_KEY": "a", "IMGWORKER_SECRET_KEY": "b", "IMGWORKER_WEBHOOK_TOKEN": "t"})
    assert cfg.worker.count == 4


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


# --- [scan.events]: the watcher's source, and the flat [scan] keys it replaced ------------------------

def test_scan_events_is_merged_key_by_key_from_file_environment_and_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[scan.events]\nsource = "minio_webhook"\nwebhook_host = "0.0.0.0"\nwebhook_port = 1\n'
                    'nats_subject = "file"\n')
    env = {"IMGWORKER_SCAN_EVENTS_WEBHOOK_PORT": "2", "IMGWORKER_SCAN_EVENTS_NATS_SUBJECT": "env",
           "IMGWORKER_SCAN_EVENTS_NATS_DURABLE": "env"}
    cfg = load_config(path=str(path), env=env, overrides={"scan": {"events": {"nats_subject": "flag"}}})
    assert cfg.scan.events == EventsConfig(source="minio_webhook", webhook_host="0.0.0.0", webhook_port=2,
                                           nats_subject="flag", nats_durable="env")


def test_the_old_flat_scan_keys_are_read_as_scan_events_with_a_warning(tmp_path, caplog):
    path = tmp_path / "c.toml"
    path.write_text('[scan]\nmode = "events"\nevents_source = "minio_nats"\nevents_filer = "f:1.2"\n'
                    'nats_url = "nats://n:4222"\nnats_subject = "s"\nnats_stream = "S"\nwebhook_host = "h"\n')
    env = {"IMGWORKER_SCAN_WEBHOOK_PORT": "9911", "IMGWORKER_SCAN_NATS_DURABLE": "d"}
    with caplog.at_level(logging.WARNING, logger="imgworker.config"):
        cfg = load_config(path=str(path), env=env)
    assert cfg.scan.events == EventsConfig(source="minio_nats", filer="f:1.2", webhook_host="h", webhook_port=9911,
                                           nats_url="nats://n:4222", nats_subject="s", nats_stream="S",
                                           nats_durable="d")
    assert "config key scan.events_source is deprecated: set source in [scan.events]" in caplog.text
    assert "scan.webhook_port is deprecated" in caplog.text


@pytest.mark.parametrize(("file", "env", "port"), [
    ("[scan]\nwebhook_port = 1\n", {"IMGWORKER_SCAN_EVENTS_WEBHOOK_PORT": "2"}, 2),
    ("[scan.events]\nwebhook_port = 1\n", {"IMGWORKER_SCAN_WEBHOOK_PORT": "2"}, 2),
    ("[scan]\nwebhook_port = 1\n", {}, 1),
])
def test_an_old_key_and_a_new_one_keep_the_precedence_of_where_they_were_set(tmp_path, file, env, port):
    path = tmp_path / "c.toml"
    path.write_text(file)
    assert load_config(path=str(path), env=env).scan.events.webhook_port == port


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"scan": {"webhook_port": 70000}}, "invalid config key scan.webhook_port: value 70000 is not allowed"),
        ({"scan": {"events": {"webhook_port": 70000}}},
         "invalid config key scan.events.webhook_port: value 70000 is not allowed"),
        ({"scan": {"events_source": "kafka"}}, "invalid config key scan.events_source: value 'kafka' is not allowed "
                                               "(one of seaweed, minio_webhook, minio_nats)"),
        ({"scan": {"events": {"source": "kafka"}}},
         "invalid config key scan.events.source: value 'kafka' is not allowed (one of seaweed, minio_webhook"),
        ({"scan": {"mode": "events", "events_filer": ""}},
         "invalid config key scan.events_filer: value '' is not allowed with scan.mode = 'events'"),
        ({"scan": {"mode": "events"}}, "invalid config key scan.events.filer: value '' is not allowed"),
        ({"scan": {"mode": "events", "events_source": "minio_webhook"}},
         "scan.events_source = 'minio_webhook' needs a token"),
        ({"scan": {"events": {"filter": "x"}}}, "unknown config key scan.events.filter in [scan.events]: did you mean `filer`?"),
        ({"scan": {"webhook_port": 1, "events": {"webhook_port": 2}}},
         "config keys scan.webhook_port and scan.events.webhook_port are both set"),
    ],
)
def test_event_source_errors_name_the_key_as_it_was_written(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(env={}, overrides=overrides)
    assert expected in str(err.value)


@pytest.mark.parametrize(("name", "key"), [("IMGWORKER_SCAN_WEBHOOK_PORT", "scan.webhook_port"),
                                           ("IMGWORKER_SCAN_EVENTS_WEBHOOK_PORT", "scan.events.webhook_port")])
def test_a_bad_event_source_variable_names_its_key(name, key):
    with pytest.raises(ConfigError, match=rf"invalid config key {key}: value 'many'"):
        load_config(env={name: "many"})


def test_a_password_in_the_nats_url_and_the_token_never_show():
    env = {"IMGWORKER_SCAN_EVENTS_NATS_URL": "nats://u:s3cret-pw@nats.internal:4222",
           "IMGWORKER_WEBHOOK_TOKEN": "tok-s3cret"}
    cfg = load_config(env=env)
    assert cfg.scan.events.nats_url == "nats://u:s3cret-pw@nats.internal:4222"
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.scan) and "nats.internal:4222" in repr(cfg)


def test_a_key_written_the_old_way_then_set_again_the_new_way_is_named_the_new_way(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[scan]\nwebhook_port = 1\n")
    with pytest.raises(ConfigError, match=r"invalid config key scan.events.webhook_port: value 'many'"):
        load_config(path=str(path), env={"IMGWORKER_SCAN_EVENTS_WEBHOOK_PORT": "many"})


def test_a_bad_value_names_the_last_layer_that_set_it(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[worker]\ncount = 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path=str(path), env={"IMGWORKER_WORKER_COUNT": "many"})
    assert str(err.value).endswith("it came from the environment variable IMGWORKER_WORKER_COUNT")


def test_an_unknown_key_with_no_near_one_lists_the_keys_of_its_section():
    with pytest.raises(ConfigError) as err:
        load_config(env={}, overrides={"dispatch": {"zzzzzz": 1}})
    assert "unknown config key dispatch.zzzzzz in [dispatch]: the keys of [dispatch] are " in str(err.value)
    assert "overflow" in str(err.value)
