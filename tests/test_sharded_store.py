"""The files of a sharded capture: rank acks, node paths and roles, and the store's gathering of
every rank's part into one commit (filesystem tests on tmp_path, no torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from ckptd.errors import ProtocolError, StoreError
from ckptd.protocol import Ack, RunPaths, check_node_id, read_ack, resolve_role, write_ack
from ckptd.store import MANIFEST, SHARD_PREFIX, Store

SHARDED: dict[str, Any] = {
    "protocol": 1, "name": "3-r1", "captured_step": 40, "slot": "r1-0", "files": {"__1_0.distcp": 10},
    "token": "abc", "token_file": "capture.json", "created": 1.0,
    "rank": 1, "world_size": 2, "capture": "40-xy",
}  # fmt: skip


def ack_file(tmp_path: Path, **changes: Any) -> Path:
    path = tmp_path / "a.json"
    path.write_text(json.dumps({**SHARDED, **changes}))
    return path


def test_a_sharded_ack_round_trips_with_its_rank_world_size_and_capture(tmp_path: Path) -> None:
    ack = read_ack(ack_file(tmp_path, files={"__1_0.distcp": 10, ".metadata": 3}))
    assert (ack.rank, ack.world_size, ack.capture, ack.sharded) == (1, 2, "40-xy", True)
    paths = RunPaths(tmp_path)
    paths.acks.mkdir(parents=True)
    assert read_ack(write_ack(paths, ack)) == ack
    assert Ack.name_for(3, 40, rank=1) == "3-r1" and Ack.name_for(None, 40, rank=0) == "step-40-r0"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"rank": 2}, "rank"),  # not below the world size
        ({"world_size": 0}, "world_size"),
        ({"world_size": None}, "world_size"),  # a rank without a world
        ({"capture": "../x"}, "capture"),
        ({"capture": None}, "capture"),
        ({"files": {"../.metadata": 3}}, "file entry"),
        ({"files": {".ckptd": 3}}, "file entry"),  # only DCP's .metadata may start with a dot
        ({"token_file": "capture.json", "world_size": None, "rank": None}, "token_file"),
    ],
)
def test_a_malformed_sharded_ack_is_refused_naming_the_field(
    tmp_path: Path, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(ProtocolError, match=field):
        read_ack(ack_file(tmp_path, **changes))


def test_a_follower_node_has_its_own_files_and_a_hostile_node_id_is_refused(tmp_path: Path) -> None:
    node = RunPaths(tmp_path).node("gpu-07.cluster")
    assert node.acks == tmp_path / ".ckptd" / "nodes" / "gpu-07.cluster" / "acks"
    assert node.status.parent == node.lock.parent == node.meta
    for bad in ("", "..", ".hidden", "a/b", "-x", "x" * 65):
        with pytest.raises(ValueError):
            check_node_id(bad)


@pytest.mark.parametrize(
    ("role", "environment", "expected"),
    [
        ("leader", {"SLURM_NODEID": "3"}, "leader"),
        ("follower", {}, "follower"),
        ("auto", {}, "leader"),
        ("auto", {"SLURM_NODEID": "0"}, "leader"),
        ("auto", {"SLURM_NODEID": "2"}, "follower"),
        ("auto", {"NODE_RANK": "1"}, "follower"),
        ("auto", {"CKPTD_NODE_RANK": "0", "SLURM_NODEID": "1"}, "leader"),  # ckptd's own first
        (None, {"NODE_RANK": " "}, "leader"),
    ],
)
def test_the_role_comes_from_the_option_else_the_first_node_rank_variable_set(
    monkeypatch: pytest.MonkeyPatch, role: str | None, environment: dict[str, str], expected: str
) -> None:
    for variable in ("CKPTD_NODE_RANK", "SLURM_NODEID", "NODE_RANK"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    assert resolve_role(role) == expected


def store_part(
    store: Store, capture: str, rank: int, world: int, files: dict[str, bytes], step: int = 40
) -> None:
    sources = store.root.parent / f"slot-{capture}-{rank}"
    sources.mkdir(parents=True, exist_ok=True)
    with store.writing_rank(capture, step, sorted(files)) as pending:
        for name, content in files.items():
            (sources / name).write_bytes(content)
            pending.copy_in(name, sources / name, len(content))
        manifest = {"tags": ["best:loss"], "metrics": {"loss": 0.5}, "run_id": "r"} if rank == 0 else {}
        store.mark_rank(pending, capture, rank, world, manifest)


def test_a_sharded_capture_is_visible_only_once_every_rank_is_stored_then_whole(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store_part(store, "40-a", 0, 3, {"__0_0.distcp": b"zero", ".metadata": b"meta"})
    store_part(store, "40-a", 2, 3, {"__2_0.distcp": b"two"})
    assert store.commit_shards("40-a") is None and not store.list()
    assert store.missing_ranks("40-a") == [1]
    assert store.shard_captures()[0][0] == "40-a"
    store_part(store, "40-a", 1, 3, {"__1_0.distcp": b"one!"})
    record = store.commit_shards("40-a")
    assert record is not None and record.name == "step-00000040" and record.tags == ("best:loss",)
    manifest = store.manifest(record.name)
    assert set(manifest["files"]) == {"__0_0.distcp", "__1_0.distcp", "__2_0.distcp", ".metadata"}
    assert manifest["ranks"] == 3 and manifest["capture"] == "40-a" and manifest["bytes"] == 15
    assert sorted(os.listdir(store.path_of(record.name))) == sorted([*manifest["files"], MANIFEST])
    assert not store.verify(record.name) and not store.shard_captures()


def test_a_commit_cut_short_after_its_manifest_is_finished_by_the_next_check(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store_part(store, "9-b", 0, 1, {"__0_0.distcp": b"x", ".metadata": b"m"}, step=9)
    record = store.commit_shards("9-b")
    assert record is not None
    # As if killed between the manifest and the rename: the directory holds both.
    os.rename(store.path_of(record.name), store.shard_dir("9-b"))
    again = store.commit_shards("9-b")
    assert again is not None and again.name == record.name and not store.verify(again.name)


def test_a_part_written_again_after_a_crash_replaces_the_half_written_file(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    shard = store.shard_dir("5-c")
    shard.mkdir(parents=True)
    (shard / "__0_0.distcp").write_bytes(b"half")  # no marker: the daemon died here
    assert not store.rank_stored("5-c", 0)
    store_part(store, "5-c", 0, 1, {"__0_0.distcp": b"whole file", ".metadata": b"m"}, step=5)
    assert store.rank_stored("5-c", 0)
    record = store.commit_shards("5-c")
    assert record is not None and (store.path_of(record.name) / "__0_0.distcp").read_bytes() == b"whole file"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda m: {**m, "files": {"../evil": {"bytes": 1}}},
        lambda m: {**m, "rank": 1},  # not the rank its name says
        lambda m: {**m, "capture": "other"},
        lambda m: {**m, "world_size": "2"},
        lambda m: [m],
    ],
)
def test_a_forged_or_corrupt_marker_is_never_committed(tmp_path: Path, tamper: Any) -> None:
    store = Store(tmp_path / "store")
    store_part(store, "1-d", 0, 1, {"__0_0.distcp": b"x"}, step=1)
    marker = store.shard_dir("1-d") / ".rank-0.json"
    marker.write_text(json.dumps(tamper(json.loads(marker.read_text()))))
    with pytest.raises(StoreError):
        store.commit_shards("1-d")
    assert not store.list() and store.missing_ranks("1-d") is None
    store.abandon_shards("1-d")
    assert not store.shard_dir("1-d").exists() and not list(store.root.glob(".tmp-*"))


def test_ranks_that_disagree_or_store_one_file_twice_never_make_a_checkpoint(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store_part(store, "2-e", 0, 2, {"__0_0.distcp": b"x"}, step=2)
    store_part(store, "2-e", 1, 3, {"__1_0.distcp": b"y"}, step=2)
    with pytest.raises(StoreError, match="disagree"):
        store.commit_shards("2-e")
    store_part(store, "2-f", 0, 2, {"same": b"x"}, step=2)
    store_part(store, "2-f", 1, 2, {"same": b"y"}, step=2)
    with pytest.raises(StoreError, match="both stored"):
        store.commit_shards("2-f")
    assert not store.list()


def test_a_hostile_capture_id_or_a_linked_shard_dir_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.ensure()
    with pytest.raises(StoreError):
        store.shard_dir("../../etc")
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / f"{SHARD_PREFIX}3-g").symlink_to(outside)
    with pytest.raises(StoreError), store.writing_rank("3-g", 3, ["x"]):
        pass
    store.abandon_shards("3-g")  # never through the link
    assert outside.is_dir() and (store.root / f"{SHARD_PREFIX}3-g").is_symlink()
    assert [c for c, _ in store.shard_captures()] == []


def test_status_shows_each_follower_node_and_a_silent_one_loudly(tmp_path: Path) -> None:
    from tests.test_cli import ckptd

    paths = RunPaths(tmp_path)
    paths.meta.mkdir()
    for node, age in (("gpu-1", 0.0), ("gpu-2", 60.0)):
        follower = paths.node(node)
        follower.meta.mkdir(parents=True)
        follower.status.write_text(json.dumps({"parts_stored": 7, "pending_acks": 1, "last_error": None}))
        os.utime(follower.status, (os.path.getmtime(follower.status) - age,) * 2)
    (paths.meta / "nodes" / "..evil").mkdir()  # not a node id: never listed
    from ckptd.protocol import read_follower_reports

    reports = read_follower_reports(paths)
    assert sorted(reports) == ["gpu-1", "gpu-2"]
    assert reports["gpu-1"]["alive"] is True and reports["gpu-2"]["alive"] is False
    paths.status.write_text(json.dumps({"pid": 1, "followers": reports}))
    out = ckptd("status", str(tmp_path)).stdout
    assert "node gpu-1: alive, 7 part(s) stored, 1 pending" in out
    assert "node gpu-2: NO HEARTBEAT" in out


@pytest.mark.parametrize(
    "changes",
    [
        {"files": {"__1_0.distcp": 10, "MANIFEST.json": 50}},  # would forge the committed manifest
        {"files": {"capture.json": 5}},
        {"files": {}},  # a part with nothing in it
        {"token": ""},  # nothing the slot's token could vouch for
    ],
)
def test_a_sharded_ack_that_could_forge_or_empty_a_checkpoint_is_refused(
    tmp_path: Path, changes: dict[str, Any]
) -> None:
    with pytest.raises(ProtocolError):
        read_ack(ack_file(tmp_path, **changes))


def test_a_manifest_cut_short_while_every_marker_is_there_is_made_again(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store_part(store, "8-h", 0, 2, {"__0_0.distcp": b"a", ".metadata": b"m"}, step=8)
    store_part(store, "8-h", 1, 2, {"__1_0.distcp": b"b"}, step=8)
    (store.shard_dir("8-h") / MANIFEST).write_bytes(b"")  # the leader died mid-write
    record = store.commit_shards("8-h")
    assert record is not None and not store.verify(record.name)
    assert not [p for p in store.path_of(record.name).iterdir() if p.name.startswith(".rank-")]


@pytest.mark.parametrize("tamper", ["missing", "short", "stray"])
def test_parts_whose_files_are_not_what_their_markers_say_are_never_committed(
    tmp_path: Path, tamper: str
) -> None:
    store = Store(tmp_path / "store")
    store_part(store, "9-i", 0, 1, {"__0_0.distcp": b"abcd", ".metadata": b"m"}, step=9)
    shard = store.shard_dir("9-i")
    if tamper == "missing":
        (shard / "__0_0.distcp").unlink()
    elif tamper == "short":
        (shard / "__0_0.distcp").write_bytes(b"ab")
    else:
        (shard / "evil.sh").write_text("#!/bin/sh\n")
    with pytest.raises(StoreError):
        store.commit_shards("9-i")
    assert not store.list()


def test_gc_keeps_a_slot_a_follower_node_s_pending_ack_names(tmp_path: Path) -> None:
    from ckptd import sweep
    from ckptd.staging import staging_dir_for

    run = tmp_path / "run"
    paths = RunPaths(run)
    paths.acks.mkdir(parents=True)
    follower = paths.node("b")
    follower.acks.mkdir(parents=True)
    ack = read_ack(ack_file(tmp_path, name="3-r1", slot="r1-0"))
    write_ack(follower, ack)
    shm = tmp_path / "shm"
    staging = staging_dir_for("runid", shm)
    (staging / "r1-0").mkdir(parents=True)
    (staging / "r9-0").mkdir()  # no ack names it: it may go
    sweep.mark(staging, run, "runid")
    (paths.meta / "state.json").write_text(json.dumps({"run_id": "runid"}))
    orphans, _ = sweep.find_orphans(shm, grace=0)
    gone = {o.path.name for o in orphans}
    assert "r1-0" not in gone and staging.name not in gone, orphans
    follower_ack = next(follower.acks.iterdir())
    follower_ack.unlink()  # committed: now nothing holds the slot
    orphans, _ = sweep.find_orphans(shm, grace=0)
    assert {o.path.name for o in orphans} & {staging.name, "r1-0"}


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "²"])
def test_a_node_rank_that_is_no_integer_is_refused_not_guessed(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.delenv("CKPTD_NODE_RANK", raising=False)
    monkeypatch.setenv("SLURM_NODEID", value)
    with pytest.raises(ValueError, match="SLURM_NODEID"):
        resolve_role("auto")
    monkeypatch.setenv("SLURM_NODEID", "00")
    assert resolve_role("auto") == "leader"
