"""Sharding a slot's tensors file at persist time, daemon side (no torch): the shard plan against
huggingface_hub's own, hostile headers refused with a clear error, the store's shard writer,
the ack field, and the persister committing shards plus an index (or one file, as before)."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ckptd.daemon.persister import Job, Outcome, Persister
from ckptd.errors import ProtocolError, StoreError
from ckptd.policy import LatestN
from ckptd.protocol import PROTOCOL_VERSION, Ack, RunPaths
from ckptd.shards import (
    Header,
    index_name,
    parse_header,
    parse_size,
    plan_groups,
    plan_shards,
    read_header,
    shard_names,
)
from ckptd.staging import MAX_HEADER_BYTES, TensorEntry, plan_layout
from ckptd.store import MANIFEST, Store

hub_base = pytest.importorskip("huggingface_hub.serialization._base")
numpy = pytest.importorskip("numpy")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

MODEL = "model.safetensors"
TOKEN = "0123abcd"

# -- the plan ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "bound", "expected"),
    [
        pytest.param([], 10, [], id="empty"),
        pytest.param([3, 4], 10, [["t0", "t1"]], id="single-shard"),
        pytest.param([4, 6], 10, [["t0", "t1"]], id="bound-exactly-hit"),
        pytest.param([4, 6, 1], 10, [["t0", "t1"], ["t2"]], id="one-byte-past-the-bound"),
        pytest.param([1, 20, 1], 10, [["t1"], ["t0", "t2"]], id="oversize-alone-and-first"),
        pytest.param([20, 30], 10, [["t0"], ["t1"]], id="all-oversize"),
        pytest.param([0, 10, 0], 10, [["t0", "t1", "t2"]], id="empty-tensors"),
        pytest.param(
            [6, 6, 2, 6, 2, 2], 10, [["t0"], ["t1", "t2"], ["t3", "t4", "t5"]], id="huggingface-docstring"
        ),
    ],
)
def test_the_plan_groups_tensors_as_huggingface_hub_does(
    sizes: list[int], bound: int, expected: list[list[str]]
) -> None:
    named = [(f"t{i}", size) for i, size in enumerate(sizes)]
    assert plan_groups(named, bound) == expected
    theirs = hub_base.split_state_dict_into_shards_factory(
        dict(named),
        get_storage_size=lambda size: size,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=bound,
    )
    assert list(theirs.filename_to_tensors.values()) == expected
    if len(expected) > 1:
        assert list(theirs.filename_to_tensors) == shard_names(MODEL, len(expected))


def test_shard_and_index_names_follow_the_library_pattern() -> None:
    assert shard_names(MODEL, 3) == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert index_name(MODEL) == "model.safetensors.index.json"
    assert index_name("adapter_model.safetensors") == "adapter_model.safetensors.index.json"
    with pytest.raises(ProtocolError, match="only a"):
        index_name("model.bin")


@pytest.mark.parametrize("size", [1234, "5GB", "50GB", "0.5MB", " 40kb ", "1TB", "3KB", "1e3KB"])
def test_sizes_parse_as_huggingface_hub_parses_them(size: int | str) -> None:
    expected = size if isinstance(size, int) else hub_base.parse_size_to_int(size)
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5GiB", "GB", "fiveGB", "nanGB", "infGB", "0KB", 0, -1, True, 1.5, None])
def test_bad_sizes_are_refused(size: Any) -> None:
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(size)


# -- hostile headers -----------------------------------------------------------------------------


def entry(
    dtype: object = "F32", shape: Sequence[object] = (2,), offsets: Sequence[object] = (0, 8)
) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    ("header", "data_bytes", "complaint"),
    [
        pytest.param({"a": entry(), "b": entry(offsets=(4, 12))}, 12, "overlaps another", id="overlap"),
        pytest.param(
            {"a": entry(), "b": entry(offsets=(8, 16))}, 12, "cover 16 data bytes", id="past-the-file"
        ),
        pytest.param({"a": entry(), "b": entry(offsets=(12, 20))}, 20, "gap", id="gap"),
        pytest.param({"a": entry()}, 16, "cover 8 data bytes, the file holds 16", id="data-left-over"),
        pytest.param([entry()], 8, "not an object", id="list-header"),
        pytest.param("a string", 0, "not an object", id="string-header"),
        pytest.param({"a": entry(dtype="F128")}, 8, "unknown dtype 'F128'", id="bad-dtype"),
        pytest.param({"a": entry(dtype="C64")}, 8, "unknown dtype", id="complex-dtype"),
        pytest.param({"a": entry(dtype=7)}, 8, "unknown dtype", id="dtype-not-a-string"),
        pytest.param({"a": entry(shape=(-2,))}, 8, "shape", id="negative-shape"),
        pytest.param({"a": entry(shape=(True, 2))}, 8, "shape", id="bool-shape"),
        pytest.param({"a": entry(shape=(2.0,))}, 8, "shape", id="float-shape"),
        pytest.param({"a": entry(shape=(3,))}, 8, "do not fit F32", id="size-mismatch"),
        pytest.param({"a": entry(offsets=(8, 0))}, 8, "do not fit", id="reversed-offsets"),
        pytest.param({"a": entry(offsets=(0, 8, 16))}, 8, "two integers", id="three-offsets"),
        pytest.param({"a": entry(offsets=(0, "8"))}, 8, "two integers", id="offset-string"),
        pytest.param({"a": {**entry(), "extra": 1}}, 8, "exactly dtype", id="extra-key"),
        pytest.param({"a": "F32"}, 8, "exactly dtype", id="entry-not-an-object"),
        pytest.param({"": entry()}, 8, "names a tensor ''", id="empty-name"),
        pytest.param({"__metadata__": {"format": 1}, "a": entry()}, 8, "__metadata__", id="metadata-not-str"),
        pytest.param({"__metadata__": ["pt"], "a": entry()}, 8, "__metadata__", id="metadata-a-list"),
    ],
)
def test_hostile_headers_are_refused_with_a_clear_error(
    header: object, data_bytes: int, complaint: str
) -> None:
    raw = json.dumps(header).encode()
    with pytest.raises(ProtocolError, match=complaint.replace("(", r"\(")):
        parse_header(raw, 8 + len(raw) + data_bytes, "slot-0/model.safetensors")


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        pytest.param(b'{"a": 1, "a": 2}', "names a key twice", id="duplicate-key"),
        pytest.param(b'{"a": ', "not valid JSON", id="truncated"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "not valid JSON|not an object", id="deep-nesting"),
        pytest.param(b"\xff\xfe", "not valid JSON", id="not-utf8"),
    ],
)
def test_malformed_json_headers_are_refused(raw: bytes, complaint: str) -> None:
    with pytest.raises(ProtocolError, match=complaint):
        parse_header(raw, 8 + len(raw), "x")


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        pytest.param(struct.pack("<Q", 2**60) + b"{}", "header length", id="huge-length"),
        pytest.param(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b" " * 64, "header length", id="above-max"),
        pytest.param(struct.pack("<Q", 0) + b"{}", "length 0", id="invalidated"),
        pytest.param(b"\x01\x02", "8-byte", id="too-short"),
    ],
)
def test_hostile_header_lengths_are_refused_before_anything_is_read(
    tmp_path: Path, content: bytes, complaint: str
) -> None:
    path = tmp_path / MODEL
    path.write_bytes(content)
    with pytest.raises(ProtocolError, match=complaint):
        read_header(path, len(content))


def test_a_header_past_the_valid_bytes_is_refused_though_the_file_is_longer(tmp_path: Path) -> None:
    path, total = write_slot_file(tmp_path, [("a", 8)])
    with pytest.raises(ProtocolError, match="header length"):
        read_header(path, 12)  # the ack names fewer bytes than the header alone
    assert read_header(path, total).tensors[0].name == "a"
    with pytest.raises(ProtocolError, match="cover 8 data bytes"):
        read_header(path, total + 4)  # the slot's spare capacity is no tensor's


def test_read_header_refuses_a_symlink(tmp_path: Path) -> None:
    path, total = write_slot_file(tmp_path, [("a", 8)])
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    with pytest.raises(ProtocolError, match="cannot open"):
        read_header(link, total)


# -- slot files, built as the client lays them out ------------------------------------------------


def tensor_bytes(name: str, nbytes: int) -> bytes:
    """Distinct, recognisable float32 values per tensor."""
    count = nbytes // 4
    base = sum(name.encode()) % 97
    return numpy.arange(base, base + count, dtype="<f4").tobytes()


def write_slot_file(
    folder: Path, tensors: Sequence[tuple[str, int]], token: str = TOKEN, spare: int = 4096
) -> tuple[Path, int]:
    """A slot's model.safetensors: header with format/token/ack metadata, data, spare capacity."""
    entries = [TensorEntry(name, "F32", (nbytes // 4,), nbytes) for name, nbytes in tensors]
    layout = plan_layout(entries, {"format": "pt", "token": token, "ack": "7"})
    data = b"".join(tensor_bytes(name, nbytes) for name, nbytes in tensors)
    path = folder / MODEL
    path.write_bytes(layout.header + data + b"\xaa" * spare)
    return path, layout.total


def header_of(tensors: Sequence[tuple[str, int]]) -> Header:
    entries = [TensorEntry(name, "F32", (nbytes // 4,), nbytes) for name, nbytes in tensors]
    layout = plan_layout(entries, {"format": "pt"})
    return parse_header(layout.header[8:], layout.total)


def test_one_shard_is_no_shard() -> None:
    header = header_of([("a", 40), ("b", 24)])
    assert plan_shards(header, MODEL, 64) is None
    assert plan_shards(header, MODEL, 10**12) is None
    assert plan_shards(header_of([]), MODEL, 1) is None


def test_shards_carry_the_slots_byte_ranges_merged_where_neighbours() -> None:
    header = header_of([("a", 40), ("b", 24), ("c", 64), ("d", 8)])
    plan = plan_shards(header, MODEL, 50)
    assert plan is not None
    start = header.data_start
    # a alone; c above the bound, alone and at once; b and d, apart in the slot, last.
    assert [(s.name, s.ranges) for s in plan.shards] == [
        ("model-00001-of-00003.safetensors", ((start, start + 40),)),
        ("model-00002-of-00003.safetensors", ((start + 64, start + 128),)),
        ("model-00003-of-00003.safetensors", ((start + 40, start + 64), (start + 128, start + 136))),
    ]
    merged = plan_shards(header, MODEL, 64 + 8)
    assert merged is not None
    assert [s.ranges for s in merged.shards] == [((start, start + 64),), ((start + 64, start + 136),)]


# -- the store writes a shard --------------------------------------------------------------------


def test_write_shard_writes_the_header_then_the_ranges_and_hashes_it_all(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.write_bytes(bytes(range(256)) * 4)
    store = Store(tmp_path / "store")
    with store.writing(3) as pending:
        digest = pending.write_shard("shard", b"HEAD", source, [(10, 20), (500, 1024), (0, 0)])
        pending.add_file("index.json", b"{}\n")
        record = store.commit(pending, {"run_id": "r", "tags": [], "metrics": {}})
    folder = store.path_of(record.name)
    content = source.read_bytes()
    assert (folder / "shard").read_bytes() == b"HEAD" + content[10:20] + content[500:1024]
    assert digest.nbytes == 4 + 10 + 524
    assert (folder / "index.json").read_bytes() == b"{}\n"
    assert store.verify(record.name) == []
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["files"]) == {"shard", "index.json"}


@pytest.mark.parametrize(
    ("ranges", "complaint"),
    [
        ([(0, 2000)], "ends after 1024 of 2000"),
        ([(20, 10)], "bad byte ranges"),
        ([(-4, 10)], "bad byte ranges"),
    ],
)
def test_write_shard_refuses_ranges_the_source_does_not_hold(
    tmp_path: Path, ranges: list[tuple[int, int]], complaint: str
) -> None:
    source = tmp_path / "source"
    source.write_bytes(bytes(1024))
    with Store(tmp_path / "store").writing(3) as pending, pytest.raises(StoreError, match=complaint):
        pending.write_shard("shard", b"HEAD", source, ranges)


def test_write_shard_never_reads_through_a_symlink(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"password" * 16)
    link = tmp_path / "model.safetensors"
    link.symlink_to(secret)
    with Store(tmp_path / "store").writing(3) as pending:
        with pytest.raises(StoreError, match="symbolic link"):
            pending.write_shard("shard", b"HEAD", link, [(0, 8)])
        assert not (pending.directory / "shard").exists()
        assert "shard" not in pending.files


# -- the ack ------------------------------------------------------------------------------------


def ack_json(**changes: object) -> dict[str, Any]:
    document = Ack(
        name="7",
        captured_step=30,
        slot="slot-0",
        files={MODEL: 100, "config.json": 5},
        token=TOKEN,
        token_file=MODEL,
        shard_bytes=50,
        created=1.0,
    ).to_json()
    document.update(changes)
    return {k: v for k, v in document.items() if v is not ...}


def test_the_ack_carries_shard_bytes_and_an_older_ack_reads_without_it(tmp_path: Path) -> None:
    assert ack_json()["shard_bytes"] == 50
    assert Ack.from_json(tmp_path / "7.json", ack_json()).shard_bytes == 50
    older = ack_json(shard_bytes=...)
    assert "shard_bytes" not in older and older["protocol"] == PROTOCOL_VERSION
    assert Ack.from_json(tmp_path / "7.json", older).shard_bytes is None
    assert Ack.from_json(tmp_path / "7.json", ack_json(shard_bytes=None)).shard_bytes is None


@pytest.mark.parametrize(
    "changes",
    [
        {"shard_bytes": 0},
        {"shard_bytes": -1},
        {"shard_bytes": True},
        {"shard_bytes": "5GB"},
        {"shard_bytes": 1.5},
        {"shard_bytes": 2**64},
        {"token": "", "token_file": "other.safetensors"},  # shards of a file the ack does not hold
    ],
)
def test_an_ack_with_a_bad_shard_bytes_is_refused(tmp_path: Path, changes: dict[str, object]) -> None:
    with pytest.raises(ProtocolError, match="shard_bytes"):
        Ack.from_json(tmp_path / "7.json", ack_json(**changes))


# -- the persister --------------------------------------------------------------------------------

TENSORS = [("embed", 400), ("layer.0", 240), ("layer.1", 240), ("head.bias", 16), ("norm", 80)]


def persist(tmp_path: Path, ack: Ack) -> tuple[Outcome, Store]:
    """Run one job through a real persister thread and return its outcome."""
    store = Store(tmp_path / "store")
    outcomes: list[Outcome] = []
    persister = Persister(
        store,
        tmp_path / "staging",
        LatestN(5),
        "run1",
        outcomes.append,
        criteria={},
        lineage=frozenset({"run1"}),
        best_steps=frozenset,
        paths=RunPaths(tmp_path / "run"),
    )
    ack_path = tmp_path / "acks" / f"{ack.name}.json"
    ack_path.parent.mkdir(exist_ok=True)
    ack_path.write_text(json.dumps(ack.to_json()))
    persister.start()
    persister.submit(Job(ack_path, ack, {}))
    persister.stop()
    (outcome,) = outcomes
    return outcome, store


def stage(tmp_path: Path, tensors: Sequence[tuple[str, int]], shard_bytes: int | None, **kw: Any) -> Ack:
    slot = tmp_path / "staging" / "slot-0"
    slot.mkdir(parents=True)
    _, total = write_slot_file(slot, tensors, kw.pop("header_token", TOKEN))
    (slot / "config.json").write_bytes(b'{"a": 1}')
    files = {MODEL: total, "config.json": 8, **kw.pop("files", {})}
    return Ack(
        name="7",
        captured_step=30,
        slot="slot-0",
        files=files,
        token=TOKEN,
        token_file=MODEL,
        shard_bytes=shard_bytes,
        created=1.0,
        **kw,
    )


def test_the_persister_commits_shards_and_an_index_that_verify(tmp_path: Path) -> None:
    outcome, store = persist(tmp_path, stage(tmp_path, TENSORS, 500))
    assert outcome.error is None and outcome.record is not None
    folder = store.path_of(outcome.record.name)
    shards = [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MANIFEST, "config.json", "model.safetensors.index.json", *shards]
    )
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index == {
        "metadata": {"total_size": 976},
        "weight_map": {
            "embed": shards[0],
            "layer.0": shards[1],
            "layer.1": shards[1],
            "head.bias": shards[1],  # 496 bytes: within the bound
            "norm": shards[2],
        },
    }
    for shard in shards:
        loaded = safetensors_numpy.load_file(str(folder / shard))
        for name, array in loaded.items():
            assert index["weight_map"][name] == shard
            assert array.tobytes() == tensor_bytes(name, dict(TENSORS)[name]), name
        with open(folder / shard, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            metadata = json.loads(handle.read(length))["__metadata__"]
        assert metadata == {"format": "pt", "token": TOKEN, "ack": "7"}
    assert store.verify(outcome.record.name) == []
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors.index.json", *shards}
    assert manifest["bytes"] == sum(p.stat().st_size for p in folder.iterdir() if p.name != MANIFEST)
    assert not (tmp_path / "acks" / "7.json").exists(), "the slot is freed once committed"


@pytest.mark.parametrize("shard_bytes", [None, 976, 10**12])
def test_what_fits_one_shard_stays_the_one_file_byte_for_byte(
    tmp_path: Path, shard_bytes: int | None
) -> None:
    ack = stage(tmp_path, TENSORS, shard_bytes)
    slot_file = (tmp_path / "staging" / "slot-0" / MODEL).read_bytes()[: ack.files[MODEL]]
    outcome, store = persist(tmp_path, ack)
    assert outcome.record is not None, outcome.error
    folder = store.path_of(outcome.record.name)
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, "config.json", MODEL]
    assert (folder / MODEL).read_bytes() == slot_file


def test_one_byte_under_the_whole_is_two_shards(tmp_path: Path) -> None:
    outcome, store = persist(tmp_path, stage(tmp_path, TENSORS, 975))  # 976 bytes of tensors
    assert outcome.record is not None, outcome.error
    folder = store.path_of(outcome.record.name)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("model")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["norm"] == "model-00002-of-00002.safetensors"


def corrupt_header(tmp_path: Path, header: dict[str, Any]) -> None:
    """Replace the slot file's header (token kept) so the slot checks pass and only parsing fails."""
    path = tmp_path / "staging" / "slot-0" / MODEL
    content = path.read_bytes()
    (length,) = struct.unpack("<Q", content[:8])
    text = json.dumps(header).encode().ljust(length)
    assert len(text) == length, "the test header must fit the old one's room"
    path.write_bytes(content[:8] + text + content[8 + length :])


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(
            {"a": entry(shape=(100,), offsets=(0, 400)), "b": entry(shape=(194,), offsets=(200, 976))},
            id="overlap",
        ),
        pytest.param({"a": entry(dtype="F4", shape=(100,), offsets=(0, 976))}, id="bad-dtype"),
        pytest.param({"a": entry(shape=(1000,), offsets=(0, 4000))}, id="past-the-file"),
    ],
)
def test_a_hostile_header_is_reported_as_a_lost_slot_and_nothing_is_committed(
    tmp_path: Path, header: dict[str, Any]
) -> None:
    ack = stage(tmp_path, TENSORS, 500)
    corrupt_header(tmp_path, {"__metadata__": {"token": TOKEN}, **header})
    outcome, store = persist(tmp_path, ack)
    assert outcome.slot_lost and outcome.record is None
    assert outcome.error is not None and "cannot shard" in outcome.error
    assert store.list() == [] and not list(store.root.iterdir())
    assert (tmp_path / "acks" / "7.json").exists(), "the daemon decides what to do with the ack"


def test_shards_that_would_replace_another_file_of_the_ack_are_refused(tmp_path: Path) -> None:
    ack = stage(tmp_path, TENSORS, 500, files={"model.safetensors.index.json": 2})
    (tmp_path / "staging" / "slot-0" / "model.safetensors.index.json").write_bytes(b"{}")
    outcome, store = persist(tmp_path, ack)
    assert outcome.slot_lost and outcome.error is not None and "replace the ack's own" in outcome.error
    assert store.list() == []
