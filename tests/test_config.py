"""RunConfig.build and preflight_store: the library path refuses what the CLI refuses (issue 7)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest

from ckptd.config import RunConfig, parse_best, preflight_store
from ckptd.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step_key": "a..b"}, "--step-key 'a..b'"),
        ({"step_key": ".step"}, "--step-key '.step'"),
        ({"step_key": "step."}, "--step-key 'step.'"),
        ({"step_key": ""}, "--step-key ''"),
        ({"poll_interval": math.nan}, "--poll-interval"),
        ({"poll_interval": math.inf}, "--poll-interval"),
        ({"poll_interval": 0.0}, "--poll-interval"),
        ({"poll_interval": -0.5}, "--poll-interval"),
        ({"poll_interval": 61.0}, "--poll-interval"),
        ({"min_delta": math.nan}, "--min-delta"),
        ({"min_delta": math.inf}, "--min-delta"),
        ({"min_delta": -1.0}, "--min-delta"),
        ({"keep_best": 0}, "--keep-best"),
        ({"log_format": "yaml"}, "--format"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_issue7_14_build_refuses_every_bad_value(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.build(tmp_path / "run", **kwargs)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_issue7_14_build_accepts_sane_values(tmp_path: Path) -> None:
    config = RunConfig.build(tmp_path, step_key="trainer.step", poll_interval=60, min_delta=0.01)
    assert (config.step_key, config.poll_interval) == ("trainer.step", 60)


def test_issue7_16_keep_best_0_names_the_option_it_came_from() -> None:
    with pytest.raises(ConfigError, match=r"^--keep-best: keep at least 1"):
        parse_best("eval_loss", 0)
    with pytest.raises(ConfigError, match=r"^--best 'eval_loss:min:0': keep at least 1"):
        parse_best("eval_loss:min:0", 1)


def test_issue7_16_preflight_accepts_a_writable_store_and_creates_nothing(tmp_path: Path) -> None:
    preflight_store(tmp_path / "run" / "checkpoints")  # nearest existing ancestor: tmp_path
    (tmp_path / "store").mkdir()
    preflight_store(tmp_path / "store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert list((tmp_path / "store").iterdir()) == []


def test_issue7_16_preflight_refuses_a_store_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("a file where a directory should be")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        preflight_store(tmp_path / "run" / "checkpoints")


def test_issue7_16_preflight_refuses_a_store_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        preflight_store(tmp_path / "checkpoints")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits; see the ro-mount test")
def test_issue7_16_preflight_refuses_a_directory_without_write_permission(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(ConfigError, match="cannot write the store"):
            preflight_store(locked / "checkpoints")
    finally:
        locked.chmod(0o755)
