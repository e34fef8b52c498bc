"""A latency budget in a file without ``adaptive = true`` is refused with what to do about it.

The README offers ``algo.adaptive = true`` or ``run --adaptive``; a budget in the file with only
the flag is accepted by that run but refused by every other command that reads the same file
(``check``, ``loadgen``, ``retry``, ``report``), which have no such flag. The refusal says how to
write the file so that every command takes it.
"""

from __future__ import annotations

import pytest

from imgworker.config import load_config
from imgworker.errors import ConfigError


def test_a_budget_without_the_controller_says_to_set_it_beside_the_budget(tmp_path):
    path = tmp_path / "imgworker.toml"
    path.write_text("[algo]\nlatency_budget_ms = 600\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path=str(path), env={})
    assert str(refused.value).startswith("invalid config key algo.latency_budget_ms: value 600.0 is not allowed "
                                         "without algo.adaptive = true")
    assert "set adaptive = true beside it, or remove it" in str(refused.value)
    assert "run --adaptive turns the controller on for that run only" in str(refused.value)


def test_the_same_file_with_the_controller_set_in_it_loads_for_every_command(tmp_path):
    path = tmp_path / "imgworker.toml"
    path.write_text("[algo]\nadaptive = true\nlatency_budget_ms = 600\n")
    cfg = load_config(path=str(path), env={})
    assert (cfg.algo.adaptive, cfg.algo.latency_budget_ms) == (True, 600.0)
