"""TOML files and CKPTD_* variables: what each layer sets, which wins, what is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ckptd.errors import ConfigError
from ckptd.settings import environment_layer, load_file, merged, run_config, run_file_of


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[run]\nkeep_lats = 2\n", "keep_lats"),
        ("[serve]\nroots = ['/x']\nscan = 1\n", "scan"),
        ("[runs]\n", "runs"),
        ("keep_last = 2\n", "keep_last"),  # a run key outside [run]
        ("[run]\nkeep_last = -1\n", "keep_last"),
        ("[run]\nkeep_last = true\n", "keep_last"),  # a bool is no count
        ("[run]\nkeep_best = 0\n", "keep_best"),
        ("[run]\npoll_interval = 0\n", "poll_interval"),
        ("[run]\nmin_delta = nan\n", "min_delta"),
        ("[run]\nbest = 'eval_loss'\n", "best"),  # a list is wanted
        ("[run]\nmode = 'up'\n", "mode"),
        ("[serve]\nroots = []\n", "roots"),
        ("[serve]\nroots = ['/x']\nmetrics_port = 70000\n", "metrics_port"),
        ("[serve]\nroots = ['/x']\nrun_file = 'a/b.toml'\n", "run_file"),
        ("[serve]\nroots = ['/x']\nlog_level = 'loud'\n", "log_level"),
        ("[run]\nformat = 'csv'\n", "format"),
    ],
)
def test_a_bad_key_or_value_is_an_error_naming_the_file_and_the_key(
    tmp_path: Path, text: str, named: str
) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_file(path)
    assert str(path) in str(caught.value) and named in str(caught.value)


def test_broken_toml_and_a_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_file(write(tmp_path / "broken.toml", "[run\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_file(tmp_path / "absent.toml")


def test_serve_settings_resolve_paths_against_the_file_and_fill_defaults(tmp_path: Path) -> None:
    node = load_file(write(tmp_path / "etc" / "node.toml", "[serve]\nroots = ['runs', '/abs']\n"))
    settings = node.serve_settings()
    assert settings.roots == (tmp_path / "etc" / "runs", Path("/abs"))
    assert settings.run_file == "ckptd.toml" and settings.drain_timeout > 0
    with pytest.raises(ConfigError, match="roots"):
        load_file(write(tmp_path / "none.toml", "[run]\nkeep_last = 1\n")).serve_settings()


def test_a_run_file_may_not_name_a_run_dir_or_hold_serve(tmp_path: Path) -> None:
    write(tmp_path / "run" / "ckptd.toml", "[run]\ndir = '/elsewhere'\n")
    with pytest.raises(ConfigError, match="dir"):
        run_file_of(tmp_path / "run")
    write(tmp_path / "run2" / "ckptd.toml", "[serve]\nroots = ['/']\n")
    with pytest.raises(ConfigError, match="serve"):
        run_file_of(tmp_path / "run2")
    assert run_file_of(tmp_path / "nothing") is None


def test_environment_values_are_parsed_by_type_and_checked() -> None:
    layer = environment_layer(
        {"CKPTD_KEEP_LAST": "3", "CKPTD_BEST": "eval_acc:max:2, bleu:max", "CKPTD_POLL": "true",
         "CKPTD_METRIC": "eval_loss", "CKPTD_MIN_DELTA": "0.01", "CKPTD_RUN_DIR": "/ignored"}
    )
    assert layer == {
        "keep_last": 3, "best": ["eval_acc:max:2", "bleu:max"], "poll": True,
        "metric": "eval_loss", "min_delta": 0.01,
    }
    with pytest.raises(ConfigError, match="CKPTD_KEEP_LAST"):
        environment_layer({"CKPTD_KEEP_LAST": "two"})


def test_each_layer_overrides_the_one_below() -> None:
    node = {"keep_last": 5, "keep_best": 2, "every_steps": 100}
    run_file = {"keep_last": 4}
    env = {"keep_best": 3}
    cli = {"every_steps": 50, "keep_last": None}  # an option not given does not override
    assert merged(node, run_file, env, cli) == {"keep_last": 4, "keep_best": 3, "every_steps": 50}


def test_run_config_from_options_matches_the_command_line_rules(tmp_path: Path) -> None:
    config = run_config(tmp_path, {"metric": "eval_acc", "mode": "max", "best": ["eval_loss:min:2"]})
    watched = [(c.metric, c.mode, k) for c, k in config.best]
    assert watched == [("eval_acc", "max", 1), ("eval_loss", "min", 2)]
    assert [c.metric for c in run_config(tmp_path, {}).criteria] == ["eval_loss"]
    assert run_config(tmp_path, {"format": "lightning-csv"}).log_format == "lightning-csv"


def test_ckptd_run_takes_its_settings_from_config_env_and_run_file_in_that_order(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write(run / "ckptd.toml", "[run]\nkeep_last = 4\nevery_steps = 30\n")
    instance = write(
        tmp_path / "exp1.toml", f"[run]\ndir = '{run}'\nkeep_last = 9\nevery_steps = 10\nkeep_best = 2\n"
    )
    # The resolved config, as `ckptd run` would build it, printed by a fresh process.
    code = (
        "import argparse, sys; from ckptd import cli;"
        "p = cli._parser(); a = p.parse_args(sys.argv[1:]);"
        "c = cli._run_config(a); print(c.run_dir, c.keep_last, c.every_steps, c.best[0][1])"
    )
    env = {"PATH": "/usr/bin:/bin", "CKPTD_EVERY_STEPS": "20"}
    out = subprocess.run(
        [sys.executable, "-c", code, "run", "--config", str(instance)],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.split()
    # dir from --config; keep_last from the run file over --config; every_steps from env over
    # both; keep_best from --config, which nothing above sets.
    assert out == [str(run), "4", "20", "2"]
    out = subprocess.run(
        [sys.executable, "-c", code, "run", "--config", str(instance), "--every-steps", "7"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.split()
    assert out[2] == "7", "the command line wins over everything"


def test_the_sidecar_follows_the_log_a_run_file_names_not_its_own_default(
    tmp_path: Path, shm_root: Path
) -> None:
    run = tmp_path / "run"
    write(run / "ckptd.toml", "[run]\nlog = \"mine.jsonl\"\n")
    done = subprocess.run(
        [sys.executable, "-m", "ckptd", "sidecar", "--run-dir", str(run), "--",
         sys.executable, "-c", "import time; time.sleep(1.5)"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    status = json.loads((run / ".ckptd" / "status.json").read_text())
    assert status["log"] == str(run / "mine.jsonl")
