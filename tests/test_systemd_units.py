"""The unit files in systemd/: ``systemd-analyze verify`` accepts them, and they say what ckptd does.

``verify`` fails (exit 1) on an ExecStart binary that does not exist, so each unit is copied
into tmp_path with ``/usr/local/bin/ckptd`` rewritten to this environment's real ``ckptd``
script; everything else is verified as shipped. ``verify`` only *warns* (exit 0) about an
unknown directive or a value it cannot parse ("..., ignoring"), so any line it prints about a
ckptd unit counts as a failure too; the tests on broken copies prove that this catches them.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.notify_socket import NotifySocket

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SHIPPED_BINARY = "/usr/local/bin/ckptd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

# Only the tests that run systemd-analyze need it; the contract tests read the files.
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)"
)

# The contract with `ckptd serve` / `ckptd run --config`: change these only together with the CLI.
SERVE_EXEC = "/usr/local/bin/ckptd serve --config /etc/ckptd/ckptd.toml"
RUN_EXEC = "/usr/local/bin/ckptd run --config /etc/ckptd/runs/%i.toml"
RELOAD_EXEC = "/bin/kill -HUP $MAINPID"


def ckptd_script() -> Path:
    script = Path(sys.executable).parent / "ckptd"
    if not script.is_file():
        pytest.skip(f"no ckptd script beside {sys.executable} (pip install -e . first)")
    return script


def install(name: str, into: Path, binary: str | None = None) -> Path:
    """Copy a shipped unit into ``into``, its ExecStart binary replaced by ``binary``."""
    text = (UNITS / name).read_text()
    assert text.count(SHIPPED_BINARY) == 1, f"{name}: expected one {SHIPPED_BINARY} (ExecStart)"
    target = into / name
    target.write_text(text.replace(SHIPPED_BINARY, binary or str(ckptd_script())))
    return target


def verify(unit: Path) -> list[str]:
    """What ``systemd-analyze verify`` objects to about a ckptd unit: [] when it accepts it."""
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = (done.stdout + done.stderr).splitlines()
    problems = [line for line in lines if "ckptd" in line]
    if done.returncode != 0:
        problems.append(f"exit status {done.returncode}: {lines}")
    return problems


def directives(name: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values, from a shipped unit file (comments and blank lines skipped)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, f"write {value!r} as plain seconds or minutes"
    return int(match[1]) * (60 if match[2] == "min" else 1)


# -- systemd accepts them --------------------------------------------------------------------


@needs_analyze
def test_verify_accepts_the_node_unit(tmp_path: Path) -> None:
    assert verify(install("ckptd.service", tmp_path)) == []


@needs_analyze
def test_verify_accepts_an_instance_of_the_template(tmp_path: Path) -> None:
    install("ckptd@.service", tmp_path)
    assert verify(tmp_path / "ckptd@exp1.service") == []


@needs_analyze
def test_verify_accepts_the_documented_user_drop_in(tmp_path: Path) -> None:
    install("ckptd@.service", tmp_path)
    drop_in = tmp_path / "ckptd@exp1.service.d"
    drop_in.mkdir()
    (drop_in / "user.conf").write_text("[Service]\nUser=alice\nGroup=alice\n")
    assert verify(tmp_path / "ckptd@exp1.service") == []
    (drop_in / "user.conf").write_text("[Service]\nUsr=alice\n")  # and it is really read
    assert any("Usr" in line for line in verify(tmp_path / "ckptd@exp1.service"))


# -- and the check can fail ------------------------------------------------------------------


@needs_analyze
@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("NotifyAccess=main", "NotifyAcess=main", "NotifyAcess"),  # a typo'd directive
        ("Type=notify", "Type=notfy", "notfy"),  # a value it cannot parse
        ("WatchdogSec=30", "WatchdogSec=half a minute", "half a minute"),
        ("\n[Service]\n", "\n[Servce]\n", "Servce"),
    ],
)
def test_verify_reports_a_broken_unit(tmp_path: Path, old: str, new: str, complaint: str) -> None:
    for name, unit in (("ckptd.service", "ckptd.service"), ("ckptd@.service", "ckptd@exp1.service")):
        path = install(name, tmp_path)
        text = path.read_text()
        assert old in text, f"{name} lacks {old!r}"
        path.write_text(text.replace(old, new, 1))
        problems = verify(tmp_path / unit)
        assert any(complaint in line for line in problems), problems


@needs_analyze
def test_verify_reports_a_missing_executable(tmp_path: Path) -> None:
    """Why the tests rewrite ExecStart: verify checks that the binary exists."""
    install("ckptd.service", tmp_path, binary="/nonexistent/bin/ckptd")
    problems = verify(tmp_path / "ckptd.service")
    assert any("/nonexistent/bin/ckptd" in line for line in problems)
    assert problems[-1].startswith("exit status 1")


# -- what they say ---------------------------------------------------------------------------


def test_node_unit_contract() -> None:
    unit = directives("ckptd.service")
    assert unit["Service.ExecStart"] == [SERVE_EXEC]
    assert unit["Service.ExecReload"] == [RELOAD_EXEC]
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.NotifyAccess"] == ["main"]
    assert unit["Service.KillSignal"] == ["SIGTERM"]
    # One SIGTERM, to the main process: it stops its workers itself, and a second SIGTERM to a
    # worker (control-group would send one) makes it exit without draining.
    assert unit["Service.KillMode"] == ["mixed"]
    assert unit["Service.Restart"] == ["on-failure"]
    assert "2" in unit["Service.RestartPreventExitStatus"][0].split()
    assert unit["Service.EnvironmentFile"] == ["-/etc/ckptd/ckptd.env"]
    assert seconds(unit["Service.WatchdogSec"][0]) > 0
    # Root, on purpose (it drops to each run's owner), but only with the capabilities for that.
    assert unit["Service.User"] == ["root"]
    caps = set(unit["Service.CapabilityBoundingSet"][0].split())
    assert {"CAP_SETUID", "CAP_SETGID"} <= caps and "CAP_SYS_ADMIN" not in caps
    # The trainers' staging slots are in the host's /dev/shm: a private /dev or /tmp hides them.
    for hiding in ("PrivateDevices", "PrivateTmp", "ProtectHome"):
        assert f"Service.{hiding}" not in unit, hiding


def test_node_unit_stop_timeout_covers_the_drain_deadline() -> None:
    settings = pytest.importorskip("ckptd.settings")
    drain = settings.ServeSettings.__dataclass_fields__["drain_timeout"].default
    stop = seconds(directives("ckptd.service")["Service.TimeoutStopSec"][0])
    assert stop >= drain + 15, f"TimeoutStopSec={stop} leaves no time after drain_timeout={drain}"


def test_template_unit_contract() -> None:
    unit = directives("ckptd@.service")
    assert unit["Service.ExecStart"] == [RUN_EXEC]
    assert unit["Service.ExecReload"] == [RELOAD_EXEC]  # `ckptd run` reloads on SIGHUP
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.NotifyAccess"] == ["main"]
    assert unit["Service.User"] != ["root"] and unit["Service.User"] != [""]
    assert unit["Service.CapabilityBoundingSet"] == [""]
    assert {"2", "3"} <= set(unit["Service.RestartPreventExitStatus"][0].split())
    for hiding in ("PrivateDevices", "PrivateTmp", "ProtectHome"):
        assert f"Service.{hiding}" not in unit, hiding


@needs_analyze
@pytest.mark.parametrize(
    ("name", "unit", "threshold"),
    [("ckptd.service", "ckptd.service", 40), ("ckptd@.service", "ckptd@exp1.service", 30)],
)
def test_hardening_keeps_exposure_low(tmp_path: Path, name: str, unit: str, threshold: int) -> None:
    """``systemd-analyze security`` scores the sandboxing (0 best, 10 worst; threshold in tenths):
    dropping the hardening lines must fail this."""
    assert SYSTEMD_ANALYZE is not None
    path = install(name, tmp_path)

    def exposure_ok() -> bool:
        done = subprocess.run(
            [
                SYSTEMD_ANALYZE,
                "security",
                "--offline=yes",
                f"--threshold={threshold}",
                "--no-pager",
                str(tmp_path / unit),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if "Unknown option" in done.stderr or "unrecognized option" in done.stderr:
            pytest.skip(f"this systemd-analyze has no offline security analysis: {done.stderr.strip()}")
        return done.returncode == 0

    assert exposure_ok()
    bare = [
        line
        for line in path.read_text().splitlines()
        if not re.match(r"(Protect|Restrict|Capab|System|NoNew|Lock)", line)
    ]
    path.write_text("\n".join(bare) + "\n")
    assert verify(tmp_path / unit) == []
    assert not exposure_ok()


# -- the CLI takes what the units give it ----------------------------------------------------


@pytest.mark.parametrize(("name", "instance"), [("ckptd.service", None), ("ckptd@.service", "exp1")])
def test_execstart_reaches_the_config_loader(tmp_path: Path, name: str, instance: str | None) -> None:
    """The ExecStart command line, config dir moved to an empty tmp dir: ckptd must parse it and
    fail on the missing config file with exit 2, the status RestartPreventExitStatus names."""
    (line,) = directives(name)["Service.ExecStart"]
    argv = shlex.split(line.replace("%i", instance or "").replace("/etc/ckptd", str(tmp_path / "etc")))
    assert argv[0] == SHIPPED_BINARY
    done = subprocess.run(
        [sys.executable, "-m", "ckptd", *argv[1:]], capture_output=True, text=True, timeout=60
    )
    if "invalid choice" in done.stderr:
        pytest.skip(f"this ckptd has no `{argv[1]}` command yet: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 2, done.stderr
    assert str(tmp_path / "etc") in done.stderr


# -- what the units expect of the daemon they start ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "serve"])
def test_daemon_keeps_the_units_promises(tmp_path: Path, command: str) -> None:
    """Started as the units start it (NOTIFY_SOCKET, WATCHDOG_USEC): READY=1 from the main pid,
    WATCHDOG=1 paced by WATCHDOG_USEC, a stack dump and no exit on WatchdogSignal (SIGUSR1),
    then on KillSignal (SIGTERM) STOPPING=1 and exit 0 well within TimeoutStopSec."""
    for name in ("ckptd.service", "ckptd@.service"):
        unit = directives(name)
        assert unit["Service.WatchdogSignal"] == ["SIGUSR1"] and unit["Service.KillSignal"] == ["SIGTERM"]
    if command == "run":
        argv = ["run", str(tmp_path / "run")]
    else:
        (tmp_path / "roots").mkdir()
        config = tmp_path / "ckptd.toml"
        config.write_text(f'[serve]\nroots = ["{tmp_path / "roots"}"]\n')
        argv = ["serve", "--config", str(config)]
    (tmp_path / "shm").mkdir()
    stderr = tmp_path / "stderr.log"
    with NotifySocket(tmp_path) as notify, stderr.open("wb") as err:
        env = notify.environ(watchdog_usec=1_000_000)  # WATCHDOG=1 every 0.5 s
        env["CKPTD_SHM_ROOT"] = str(tmp_path / "shm")
        proc = subprocess.Popen([sys.executable, "-m", "ckptd", *argv], env=env, stderr=err)
        try:
            assert notify.wait_for("READY=1").pid == proc.pid, stderr.read_text()
            first = notify.wait_for("WATCHDOG=1")
            assert notify.wait_for("WATCHDOG=1", timeout=5).pid == first.pid == proc.pid
            proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while "most recent call first" not in stderr.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "most recent call first" in stderr.read_text()
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            notify.wait_for("STOPPING=1")
            assert proc.wait(timeout=30) == 0, stderr.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
