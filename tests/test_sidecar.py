"""``ckptd sidecar``: a real daemon tied to a real command, and the start-up hook in its tree.

Every test runs ``python -m ckptd sidecar`` as a process; the commands are real programs
(tests/programs/sidecar_*.py), the signals real signals. The transformers tests build real
Trainers (a tiny GPT-2 from its config) in a child interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckptd.protocol import RunPaths
from ckptd.sidecar import HOOK_DIR
from tests.conftest import PROGRAMS, Daemon, wait_for

# Every test stages in its own shm folder (CKPTD_SHM_ROOT), removed afterwards: daemons killed
# on purpose here must not leave staging dirs in the real /dev/shm.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_root")]

CHILD = str(PROGRAMS / "sidecar_child.py")
ROOT = Path(__file__).resolve().parent.parent


def sidecar(run_dir: Path | str, *command: str, options: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "ckptd", "sidecar", "--run-dir", str(run_dir), *options, "--", *command]


def run(argv: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)


def ckptd(*args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "ckptd", *args], timeout=60)


def assert_daemon_stopped(run_dir: Path) -> None:
    status = json.loads(RunPaths(run_dir).status.read_bytes())
    assert status["state"] == "stopped", status
    with pytest.raises(ProcessLookupError):
        os.kill(status["pid"], 0)


# -- the command's life -----------------------------------------------------------------------


def test_the_commands_exit_status_is_the_sidecars(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    exited = run(sidecar(run_dir, sys.executable, CHILD, "exit", "3"))
    assert exited.returncode == 3, exited.stderr
    assert_daemon_stopped(run_dir)
    killed = run(sidecar(run_dir, sys.executable, CHILD, "sigkill"))
    assert killed.returncode == 128 + signal.SIGKILL, killed.stderr  # 137, as a shell says
    assert "killed by SIGKILL" in killed.stderr
    assert_daemon_stopped(run_dir)


def test_sigterm_reaches_the_command_and_the_daemon_persists_before_stopping(
    tmp_path: Path, shm_root: Path
) -> None:
    run_dir, ready, marker = tmp_path / "run", tmp_path / "ready", tmp_path / "marker"
    out, err = tmp_path / "sidecar.out", tmp_path / "sidecar.err"
    command = (sys.executable, CHILD, "trap", str(ready), str(marker))
    argv = sidecar(run_dir, *command, options=("--keep-last", "1"))
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr)
    try:
        wait_for(ready.exists, timeout=60, what=f"the command to start; sidecar said:\n{err.read_text()}")
        # The daemon follows the same DIR: the query commands find it while the command runs.
        status = ckptd("status", str(run_dir))
        assert status.returncode == 0, status.stdout + status.stderr
        assert "running" in status.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert marker.read_text() == "SIGTERM"  # the command got it, captured, exited 0
    # The capture was acknowledged just before the command exited: the daemon, stopped with
    # SIGTERM right after, persisted it before stopping.
    assert_daemon_stopped(run_dir)
    best = ckptd("best", str(run_dir))
    assert best.returncode == 0, best.stderr
    path = Path(best.stdout.strip())
    assert path.name == "step-00000040" and (path / "MANIFEST.json").is_file()
    listed = ckptd("ls", str(run_dir), "--json")
    assert [c["step"] for c in json.loads(listed.stdout)] == [40]
    said = err.read_text()
    assert "1 checkpoint(s) kept" in said and f"best: {path}" in said  # the summary
    assert "STEP" in said and "step-00000040" in said  # the ls table


def test_refuses_to_start_when_another_daemon_follows_the_run(
    tmp_path: Path, daemons: Callable[..., Daemon]
) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    run_dir.mkdir()
    other = daemons(run_dir, "--log", "ckptd-metrics.jsonl")
    refused = run(sidecar(run_dir, sys.executable, "-c", f"open({str(marker)!r}, 'w')"))
    assert refused.returncode == 3, refused.stderr
    assert "another daemon already follows it" in refused.stderr
    assert "command not started" in refused.stderr
    assert not marker.exists()
    assert other.proc.poll() is None  # the first daemon is left alone


def test_a_sidecar_killed_outright_takes_its_daemon_with_it(tmp_path: Path) -> None:
    # SIGKILL or the OOM killer: no handler runs. An orphaned daemon would follow the run for
    # good and refuse every later sidecar on it (exit 3).
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(sidecar(run_dir, sys.executable, "-c", "import time; time.sleep(20)"))
    try:
        wait_for(lambda: RunPaths(run_dir).status.exists(), what="the daemon's heartbeat")
        daemon_pid = json.loads(RunPaths(run_dir).status.read_bytes())["pid"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        def gone() -> bool:
            try:
                os.kill(daemon_pid, 0)
            except ProcessLookupError:
                return True
            return False

        wait_for(gone, timeout=30, what="the orphaned daemon to stop")
        again = run(sidecar(run_dir, sys.executable, "-c", "pass"))
        assert again.returncode == 0, again.stderr
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_second_interrupt_ends_the_wait_for_a_stuck_daemon(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    child = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(30)"
    proc = subprocess.Popen(sidecar(run_dir, sys.executable, "-c", child), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: RunPaths(run_dir).status.exists(), what="the daemon's heartbeat")
        daemon_pid = json.loads(RunPaths(run_dir).status.read_bytes())["pid"]
        os.kill(daemon_pid, signal.SIGSTOP)  # a daemon that will not stop (stuck persisting)
        proc.send_signal(signal.SIGTERM)  # the command ends; the sidecar now waits for the daemon
        assert proc.stderr is not None
        for line in proc.stderr:
            if "interrupt again to stop waiting" in line:
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 143  # the command's own status (it ended on SIGTERM)
        assert "interrupted while the daemon was persisting" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_summary_names_a_watched_metric_the_log_never_held(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    child = textwrap.dedent(
        f"""
        import json, time
        with open({str(run_dir / "ckptd-metrics.jsonl")!r}, "a") as log:
            for step in (10, 20, 30):
                log.write(json.dumps({{"step": step, "val_loss": 1.0 / step}}) + "\\n")
        time.sleep(2.5)
        """
    )
    done = run(sidecar(run_dir, sys.executable, "-c", child))  # --metric defaults to eval_loss
    assert done.returncode == 0, done.stderr
    assert "the daemon's last error" in done.stderr and "eval_loss" in done.stderr, done.stderr
    assert "val_loss" in done.stderr.split("the daemon's last error")[1], done.stderr


def test_bad_options_exit_2_and_create_nothing(tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    touch = (sys.executable, "-c", f"open({str(marker)!r}, 'w')")
    for options in (("--keep-best", "0"), ("--poll-interval", "0"), ("--regex", "(")):
        bad = run(sidecar(run_dir, *touch, options=options))
        assert bad.returncode == 2, (options, bad.stderr)
        assert bad.stderr.startswith("ckptd: "), bad.stderr
    no_command = run([sys.executable, "-m", "ckptd", "sidecar", "--run-dir", str(run_dir), "--"])
    assert no_command.returncode == 2 and "no command to run" in no_command.stderr
    assert not run_dir.exists() and not marker.exists()


def test_a_command_not_found_exits_127_and_the_daemon_is_stopped(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    missing = run(sidecar(run_dir, str(tmp_path / "no-such-trainer")))
    assert missing.returncode == 127, missing.stderr
    assert "command not found" in missing.stderr
    assert_daemon_stopped(run_dir)


# -- the start-up hook ------------------------------------------------------------------------


def test_every_python_process_of_the_tree_is_hooked_and_the_old_sitecustomize_still_runs(
    tmp_path: Path,
) -> None:
    theirs = tmp_path / "their-site"
    theirs.mkdir()
    marker, report = tmp_path / "theirs-ran", tmp_path / "report.json"
    (theirs / "sitecustomize.py").write_text(
        "import os\nwith open(os.environ['THEIR_MARKER'], 'a') as f:\n"
        "    f.write(f'{os.getpid()} {__name__}\\n')\n"
    )
    probe = textwrap.dedent(
        f"""
        import json, os, sys
        json.dump({{
            "pid": os.getpid(),
            "hooked": any(getattr(f, "__ckptd_hook__", False) for f in sys.meta_path),
            "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "ckptd")),
            "env": {{k: os.environ.get(k) for k in ("CKPTD_RUN_DIR", "CKPTD_HOOK")}},
            "path": os.environ["PYTHONPATH"].split(os.pathsep),
        }}, open({str(report)!r}, "w"))
        """
    )
    (tmp_path / "probe.py").write_text(probe)
    # The Python process is a grandchild: the command is a shell that starts it.
    shell = f"{shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / 'probe.py'))}"
    env = {**os.environ, "PYTHONPATH": str(theirs), "THEIR_MARKER": str(marker)}
    done = run(sidecar("run", "/bin/sh", "-c", shell), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    seen = json.loads(report.read_text())
    assert seen["hooked"]
    assert seen["heavy"] == []  # neither torch, nor transformers, nor ckptd itself
    assert seen["env"] == {"CKPTD_RUN_DIR": str(tmp_path / "run"), "CKPTD_HOOK": "1"}
    assert seen["path"] == [str(HOOK_DIR), str(theirs)]
    # Their sitecustomize ran in the grandchild, after ours, under its own name (and in the
    # sidecar and its daemon, which have their PYTHONPATH without ours).
    ran = marker.read_text().splitlines()
    assert f"{seen['pid']} sitecustomize" in ran and len(ran) == 3


def probe_trainers(env: dict[str, str], tmp_path: Path, via_sidecar: bool) -> tuple[dict[str, object], str]:
    report = tmp_path / f"probe-{via_sidecar}-{len(list(tmp_path.iterdir()))}.json"
    command = [sys.executable, str(PROGRAMS / "sidecar_hf_probe.py"), str(report)]
    argv = sidecar(tmp_path / "run", *command) if via_sidecar else command
    done = run(argv, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(report.read_text()), done.stderr


def test_the_hook_adds_one_callback_to_a_real_trainer_and_changes_nothing_else(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    # A stand-in callback class, named the way the hook lets one be named.
    env = {
        **os.environ,
        "CKPTD_HF_CALLBACK": "sidecar_standin_callback:StandInCallback",
        "PYTHONPATH": str(PROGRAMS),
    }
    plain, _ = probe_trainers(env, tmp_path, via_sidecar=False)
    hooked, _ = probe_trainers(env, tmp_path, via_sidecar=True)
    assert not plain["hooked"] and hooked["hooked"]
    assert hooked["signature"] == plain["signature"]  # inspect.signature(Trainer.__init__)
    assert hooked["subclass_signature"] == plain["subclass_signature"]
    assert hooked["init_name"] == plain["init_name"] == "Trainer.__init__"
    for report in (plain, hooked):
        assert report["same_class"]  # transformers.Trainer is transformers.trainer.Trainer
        assert report["class_module"] == "transformers.trainer"
        assert report["isinstance"] and report["issubclass"] and report["type_is"]
        assert report["sub_init_done"]
    assert (plain["callbacks"], plain["sub_callbacks"]) == (0, 0)
    # Exactly one: on a Trainer, on a subclass (its super().__init__ is the wrapped one), and
    # on a subclass given one already.
    assert (hooked["callbacks"], hooked["sub_callbacks"], hooked["sub_given_callbacks"]) == (1, 1, 1)
    assert plain["sub_given_callbacks"] == 1


def test_a_callback_that_cannot_be_loaded_is_one_warning_and_the_run_goes_on(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    env = {
        **os.environ,
        "CKPTD_HOOK": "1",
        "CKPTD_HF_CALLBACK": "no_such_module_here:Nope",
        "PYTHONPATH": str(HOOK_DIR),
    }
    report, stderr = probe_trainers(env, tmp_path, via_sidecar=False)
    assert report["hooked"] and report["sub_init_done"]  # three Trainers built, all usable
    warnings = [line for line in stderr.splitlines() if line.startswith("ckptd hook: warning")]
    assert len(warnings) == 1, stderr
    assert "no_such_module_here" in warnings[0] and "without ckptd's callback" in warnings[0]


def test_end_to_end_a_plain_hf_script_keeps_its_best_eval(tmp_path: Path, shm_root: Path) -> None:
    pytest.importorskip("transformers")
    if importlib.util.find_spec("ckptd.integrations.hf") is None:
        pytest.skip("ckptd.integrations.hf is not written yet")
    run_dir = tmp_path / "run"
    script = [sys.executable, str(PROGRAMS / "sidecar_hf_train.py"), str(run_dir / "hf")]
    done = run(sidecar(run_dir, *script), timeout=300)
    assert done.returncode == 0, done.stderr
    evals = [
        line
        for line in map(json.loads, (run_dir / "ckptd-metrics.jsonl").read_text().splitlines())
        if "eval_loss" in line
    ]
    assert len(evals) == 6
    best_step = min(evals, key=lambda e: e["eval_loss"])["step"]
    best = ckptd("best", str(run_dir))
    assert best.returncode == 0, best.stderr
    assert Path(best.stdout.strip()).name == f"step-{best_step:08d}"
    assert f"best: {best.stdout.strip()}" in done.stderr
    assert_daemon_stopped(run_dir)


LAUNCHER = """
import subprocess, sys
# As `swift sft` does: run the real trainer and pass no signal on (SIGTERM kills us at once).
subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2]])
"""
TRAINER = """
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def stop(signum, frame):
    (out / "trainer-got").write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
(out / "trainer.pid").write_text(str(os.getpid()))
while True:
    time.sleep(0.05)
"""


def written(path: Path) -> bool:
    """The file is there with its content: ``write_text`` creates it empty before it writes (a
    pid read in between was once an empty string, and the test then hung on the sidecar)."""
    return path.exists() and bool(path.read_text().strip())


def test_a_sigterm_also_ends_the_trainer_a_launcher_leaves_behind(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = sidecar(run_dir, sys.executable, "-c", LAUNCHER, TRAINER, str(tmp_path))
    with subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) as proc:
        wait_for(lambda: written(tmp_path / "trainer.pid"), timeout=60)
        trainer = int((tmp_path / "trainer.pid").read_text())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert (tmp_path / "trainer-got").read_text() == "SIGTERM", err
    assert "left 1 process(es) running" in err
    with pytest.raises(ProcessLookupError):
        os.kill(trainer, 0)  # gone, and reaped: no zombie either
    assert_daemon_stopped(run_dir)


NESTED = """
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
if os.fork() == 0:  # the trainer's own child: not an orphan yet when the launcher dies
    signal.signal(signal.SIGTERM, lambda *_: ((out / "grandchild-got").write_text("TERM"), os._exit(0)))
    (out / "grandchild.pid").write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the trainer leaves at once
(out / "trainer.pid").write_text(str(os.getpid()))
while True:
    time.sleep(0.05)
"""


def test_processes_that_become_orphans_while_leftovers_are_ended_are_ended_too(tmp_path: Path) -> None:
    argv = sidecar(tmp_path / "run", sys.executable, "-c", LAUNCHER, NESTED, str(tmp_path))
    with subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) as proc:
        wait_for(
            lambda: written(tmp_path / "grandchild.pid") and written(tmp_path / "trainer.pid"), timeout=60
        )
        grandchild = int((tmp_path / "grandchild.pid").read_text())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert (tmp_path / "grandchild-got").read_text() == "TERM", err
    with pytest.raises(ProcessLookupError):
        os.kill(grandchild, 0)
