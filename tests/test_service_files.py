"""The files in service/ a user copies: they parse, and what they pass to ckptd is what ckptd takes.

- ``kubernetes/pod.yaml``: both containers share the run volume and a memory-backed /dev/shm,
  at the same paths, under one UID; the daemon follows the dir the trainer is told about.
- ``slurm/train.sbatch``: bash accepts it (and the script it runs on each node); the sidecar's
  options are options of ``ckptd sidecar``.
- ``ckptd.env``: every variable it names is one ckptd reads, with a value ckptd accepts.
- ``Containerfile``: what it copies is enough to build ckptd, and that build asks for no torch.
"""

from __future__ import annotations

import argparse
import email
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from ckptd.cli import _parser

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """``argv`` through ckptd's own argument parser; a bad option fails the test."""
    try:
        return _parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"ckptd rejects {argv}") from exc


# -- Kubernetes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pod() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed in this environment")
    document: dict[str, Any] = yaml.safe_load((SERVICE / "kubernetes" / "pod.yaml").read_text())
    return document


def containers(pod: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    (daemon,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "ckptd"]
    (trainer,) = [c for c in pod["spec"]["containers"] if c["name"] == "trainer"]
    return daemon, trainer


def mounts(container: dict[str, Any]) -> dict[str, str]:
    return {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}


def test_pod_shares_the_run_volume_and_a_memory_dev_shm(pod: dict[str, Any]) -> None:
    assert pod["apiVersion"] == "v1" and pod["kind"] == "Pod"
    daemon, trainer = containers(pod)
    assert mounts(daemon) == mounts(trainer)  # the same volumes at the same paths
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    shm = volumes[mounts(daemon)["/dev/shm"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert shm["emptyDir"]["sizeLimit"]
    run_dir = daemon["args"][1]
    run_mount = next(path for path in mounts(daemon) if run_dir.startswith(path + "/"))
    assert "persistentVolumeClaim" in volumes[mounts(daemon)[run_mount]]


def test_pod_daemon_follows_the_trainers_run_dir(pod: dict[str, Any]) -> None:
    daemon, trainer = containers(pod)
    assert daemon["args"][0] == "run"
    args = parse_cli(daemon["args"])
    env = {item["name"]: item["value"] for item in trainer["env"]}
    assert args.run_dir == env["CKPTD_RUN_DIR"]
    for probe in ("startupProbe", "livenessProbe"):
        assert daemon[probe]["exec"]["command"] == ["ckptd", "status", args.run_dir]


def test_pod_daemon_is_a_native_sidecar_in_the_trainers_uid(pod: dict[str, Any]) -> None:
    daemon, trainer = containers(pod)
    # Started before the trainer, stopped (SIGTERM, then its drain) after it.
    assert daemon["restartPolicy"] == "Always"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 60
    # Staging dir 0700 and slots 0600: one UID, set for the pod, not overridden by either.
    assert isinstance(pod["spec"]["securityContext"]["runAsUser"], int)
    for container in (daemon, trainer):
        assert "runAsUser" not in container.get("securityContext", {})
    # Liveness is a status file's mtime, not a pid: no shared process namespace is needed.
    assert not pod["spec"].get("shareProcessNamespace", False)


# -- Slurm ------------------------------------------------------------------------------------

SBATCH = SERVICE / "slurm" / "train.sbatch"


SHARDED_SBATCH = SERVICE / "slurm" / "train-sharded.sbatch"


def node_script(sbatch: Path = SBATCH) -> str:
    """The script ``srun ... bash -c '...'`` runs on every node."""
    match = re.search(r"bash -c '\n(.*?)\n'\n", sbatch.read_text(), re.S)
    assert match, "the srun line's bash -c '...' script was not found"
    return match[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_sbatch_is_valid_bash() -> None:
    for script in (SBATCH.read_text(), node_script()):
        done = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_sbatch_sidecar_options_are_ckptds() -> None:
    match = re.search(r"exec ckptd sidecar (.*?) -- ", node_script().replace("\\\n", " "), re.S)
    assert match, "no `exec ckptd sidecar ... --` in the node script"
    options = shlex.split(match[1].replace('"$OUT"', "/shared/runs/x"))
    args = parse_cli(["sidecar", *options, "--", "torchrun", "train.py"])
    assert args.run_dir == "/shared/runs/x"
    # The sidecar's stop deadline must end before Slurm's SIGKILL: --signal=TERM@<seconds>.
    lead = re.search(r"#SBATCH --signal=TERM@(\d+)", SBATCH.read_text())
    assert lead, "no #SBATCH --signal=TERM@<seconds>"
    assert args.stop_timeout < int(lead[1])


def test_sbatch_starts_the_sidecar_only_beside_global_rank_0() -> None:
    script = node_script()
    guard = script.index('if [ "$SLURM_NODEID" -ne 0 ]')
    assert guard < script.index("exec ckptd sidecar")
    assert '--node-rank "$SLURM_NODEID"' in script  # static rendezvous: node 0 holds rank 0


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_the_sharded_sbatch_runs_a_sidecar_on_every_node_whose_role_is_its_node_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ckptd.protocol import resolve_role

    script = node_script(SHARDED_SBATCH)
    for text in (SHARDED_SBATCH.read_text(), script):
        done = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert "SLURM_NODEID\" -ne 0" not in script and script.lstrip().startswith("exec ckptd sidecar")
    match = re.search(r"exec ckptd sidecar (.*?) -- ", script.replace("\\\n", " "), re.S)
    assert match, "no `exec ckptd sidecar ... --` in the node script"
    args = parse_cli(["sidecar", *shlex.split(match[1].replace('"$OUT"', "/x")), "--", "torchrun"])
    assert args.role is None and args.shard_timeout == 600  # auto: from the node rank
    lead = re.search(r"#SBATCH --signal=TERM@(\d+)", SHARDED_SBATCH.read_text())
    assert lead and args.stop_timeout < int(lead[1])
    for node, role in (("0", "leader"), ("1", "follower")):
        monkeypatch.setenv("SLURM_NODEID", node)
        monkeypatch.delenv("CKPTD_NODE_RANK", raising=False)
        assert resolve_role(args.role) == role
    assert '--node-rank "$SLURM_NODEID"' in script


# -- the environment file ---------------------------------------------------------------------


def env_assignments() -> dict[str, str]:
    """Every ``KEY=VALUE`` in ckptd.env, the commented-out examples included."""
    found = {}
    for line in (SERVICE / "ckptd.env").read_text().splitlines():
        match = re.fullmatch(r"#?([A-Z_][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            found[match[1]] = match[2]
    return found


def test_env_file_names_only_variables_ckptd_reads() -> None:
    """A misspelt variable would be silently ignored: each one is a run option (parsed here as
    ckptd parses it) or a name ckptd's code reads literally."""
    settings = pytest.importorskip("ckptd.settings")
    assignments = env_assignments()
    ckptd_vars = {name for name in assignments if name.startswith("CKPTD_")}
    assert {"CKPTD_SHM_ROOT", "CKPTD_KEEP_LAST"} <= ckptd_vars
    run_vars = {settings.ENV_PREFIX + key.upper() for key in settings.RUN_KEYS}
    source = "\n".join(path.read_text() for path in (ROOT / "ckptd").rglob("*.py"))
    for name in ckptd_vars - run_vars:
        assert f'"{name}"' in source, f"ckptd.env: nothing in ckptd reads {name}"
    layer = settings.environment_layer(assignments)  # raises ConfigError on a bad value
    assert set(layer) == {name.removeprefix("CKPTD_").lower() for name in ckptd_vars & run_vars}
    # Shared by every run of the node: a store or log here would be shared too.
    assert not {"CKPTD_STORE", "CKPTD_LOG"} & set(assignments)


def test_env_file_is_systemd_syntax() -> None:
    for line in (SERVICE / "ckptd.env").read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", stripped), line
            assert not stripped.startswith("export ")


# -- the container image ------------------------------------------------------------------------


def copied_sources() -> list[str]:
    sources = []
    for line in (SERVICE / "Containerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *from_context, _destination = line.split()[1:]
            sources += from_context
    return sources


def test_containerfile_basics() -> None:
    text = (SERVICE / "Containerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["ckptd"\]$', text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("0", "root"))
    for source in copied_sources():
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


@pytest.mark.slow
def test_containerfile_sources_build_ckptd_without_torch(tmp_path: Path) -> None:
    """Build a wheel from just what the Containerfile copies, offline, with this environment's
    setuptools: the copy is complete, and the package it makes does not require torch."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for source in copied_sources():
        origin = ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, src / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(origin, src / source)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("ckptd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata_name = next(name for name in names if name.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(metadata_name))
    assert "ckptd/_hook/sitecustomize.py" in names and "ckptd/cli.py" in names
    # pyproject's readme: without README.md in the copy the build still works, silently bare.
    assert (ROOT / "README.md").read_text().splitlines()[0] in str(metadata.get_payload())
    requires = metadata.get_all("Requires-Dist") or []
    unconditional = [req for req in requires if "extra ==" not in req]
    assert "orjson" in " ".join(unconditional)
    assert not [req for req in unconditional if re.match(r"torch\b", req)], unconditional
