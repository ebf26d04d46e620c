"""Snapshots through the real path: a nested torch state flattened into a slot file laid out as
safetensors, persisted by the store, and loaded back bit-identical; slot reuse and recreation; and the
trainer-side client staying a silent no-op when no daemon is alive."""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from ckptd.client import CheckpointClient, load_snapshot
from ckptd.client.snapshot import Slot, encode_structure, flatten_state, layout_for
from ckptd.errors import UnsupportedLeafError
from ckptd.protocol import Control, RunPaths, write_control
from ckptd.records import Verdict
from ckptd.staging import STRUCTURE_FILE, TENSORS_FILE
from ckptd.store import Store

MiB = 1 << 20
GRANULE = 64 * MiB


def persist(state: Any, tmp_path: Path, step: int = 1) -> Path:
    """Stage ``state`` in a slot as the client does, copy it into the store as the daemon does."""
    tensors, skeleton = flatten_state(state)
    layout = layout_for(tensors)
    structure = encode_structure(skeleton, step)
    slot = Slot(tmp_path / "shm" / "slot-0")
    try:
        slot.ensure_capacity(layout.total)
        slot.write(layout, tensors, structure)
        assert slot.capacity >= layout.total
        store = Store(tmp_path / "checkpoints")
        with store.writing(step) as pending:
            pending.copy_in(TENSORS_FILE, slot.tensors_path, layout.total)
            pending.copy_in(STRUCTURE_FILE, slot.directory / STRUCTURE_FILE, len(structure))
            record = store.commit(pending, {})
    finally:
        slot.unlink()
    assert not (tmp_path / "shm" / "slot-0").exists()
    return store.path_of(record.name)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: Any, want: Any, path: str = "") -> None:
    """Equal, and of the same types all the way down: int keys stay ints, tuples stay tuples."""
    where = path or "<root>"
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert (got.dtype, got.shape) == (want.dtype, want.shape), where
        assert torch.equal(bits(got), bits(want)), where
        return
    if isinstance(want, Mapping):
        assert isinstance(got, dict), where
        assert [(type(k), k) for k in got] == [(type(k), k) for k in want], where
        for key in want:
            assert_same(got[key], want[key], f"{path}/{key}")
        return
    assert type(got) is type(want), f"{where}: {type(got).__name__} is not {type(want).__name__}"
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}/{i}")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), where
    else:
        assert got == want, where


# -- a real model and optimizer --------------------------------------------------------------------


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # BatchNorm brings an int64 buffer (num_batches_tracked) next to the float weights.
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=generator), torch.randn(32, 4, generator=generator)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> float:
    inputs, targets = batch(seed)
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(inputs), targets)
    loss.backward()
    optimizer.step()
    return loss.item()


def test_model_and_adam_round_trip_and_training_continues_identically(tmp_path: Path) -> None:
    model = make_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.01)
    for seed in range(3):
        train_step(model, optimizer, seed)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 3, "epoch": 0.5}
    expected = copy.deepcopy(state)

    directory = persist(state, tmp_path, step=3)
    loaded = load_snapshot(directory)

    assert_same(loaded, expected)
    for name, tensor in expected["model"].items():
        assert torch.equal(loaded["model"][name], tensor), name
    opt = loaded["optimizer"]
    assert sorted(opt["state"]) == [0, 1, 2, 3, 4, 5]
    assert all(type(k) is int for k in opt["state"])
    assert set(opt["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    (group,) = opt["param_groups"]
    assert group["betas"] == (0.8, 0.95) and type(group["betas"]) is tuple
    assert group["params"] == [0, 1, 2, 3, 4, 5]
    assert loaded["model"]["1.num_batches_tracked"].dtype == torch.int64

    # A fresh model with other weights and an optimizer with another lr become the original again.
    restored = make_model(1)
    restored_opt = torch.optim.Adam(restored.parameters(), lr=0.5)
    restored.load_state_dict(loaded["model"])
    restored_opt.load_state_dict(loaded["optimizer"])
    assert restored_opt.param_groups[0]["lr"] == 1e-2

    for seed in (10, 11):
        assert train_step(restored, restored_opt, seed) == train_step(model, optimizer, seed)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# -- dtypes and tensor shapes ----------------------------------------------------------------------

_GEN = torch.Generator().manual_seed(1234)


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=_GEN).to(dtype)


def _randint(low: int, high: int, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=_GEN, dtype=dtype)


TENSOR_CASES = {
    "float64": _randn(3, 5, dtype=torch.float64),
    "float32": _randn(7, dtype=torch.float32),
    "float16": _randn(2, 3, 4, dtype=torch.float16),
    "bfloat16": _randn(9, dtype=torch.bfloat16),
    "float32-non-finite": torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-45]),
    "float8-e4m3": _randn(5, dtype=torch.float8_e4m3fn),
    "float8-e5m2": _randn(5, dtype=torch.float8_e5m2),
    "int64": _randint(-(2**62), 2**62, 4, dtype=torch.int64),
    "int32": _randint(-(2**31), 2**31 - 1, 3, 3, dtype=torch.int32),
    "int16": _randint(-(2**15), 2**15 - 1, 5, dtype=torch.int16),
    "int8": _randint(-128, 127, 3, dtype=torch.int8),  # odd size: what follows is misaligned
    "uint8": _randint(0, 255, 11, dtype=torch.uint8),
    "bool": torch.rand(13, generator=_GEN) > 0.5,
    "zero-dim": torch.tensor(3.25, dtype=torch.float64),
    "zero-dim-int": torch.tensor(7),
    "empty": torch.empty(0, 3),
    "empty-int": torch.empty(4, 0, dtype=torch.int32),
    "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
    "slice-view": torch.arange(20, dtype=torch.int64)[5:11],
    "strided-view": torch.arange(30, dtype=torch.float64)[::4],
    "expanded": torch.tensor([1.0, 2.0, 3.0]).expand(4, 3),
    "parameter": torch.nn.Parameter(torch.ones(2, 2)),
}


@pytest.mark.parametrize("tensor", list(TENSOR_CASES.values()), ids=list(TENSOR_CASES))
def test_tensor_round_trip(tmp_path: Path, tensor: torch.Tensor) -> None:
    loaded = load_snapshot(persist({"t": tensor, "list": [tensor]}, tmp_path))
    for got in (loaded["t"], loaded["list"][0]):
        assert isinstance(got, torch.Tensor)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(bits(got), bits(tensor.detach()))


def test_all_dtypes_back_to_back_in_one_standard_safetensors_file(tmp_path: Path) -> None:
    state = {"layer": dict(TENSOR_CASES), "root": TENSOR_CASES["float32"]}
    directory = persist(state, tmp_path)
    loaded = load_snapshot(directory)
    assert_same(loaded, {"layer": {k: v.detach() for k, v in TENSOR_CASES.items()}, "root": state["root"]})

    with safe_open(str(directory / TENSORS_FILE), framework="pt") as handle:
        assert set(handle.keys()) == {f"layer/{name}" for name in TENSOR_CASES} | {"root"}
        assert handle.metadata() == {"format": "ckptd"}
        assert torch.equal(handle.get_tensor("layer/int64"), TENSOR_CASES["int64"])
        assert torch.equal(handle.get_tensor("layer/transposed"), TENSOR_CASES["transposed"])


def test_tensor_named_like_the_safetensors_metadata_key(tmp_path: Path) -> None:
    state = {"__metadata__": torch.arange(4), "w": torch.ones(2)}
    assert_same(load_snapshot(persist(state, tmp_path)), state)


def _random_bits(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """Every bit pattern is fair game (NaN payloads, subnormals): bit identity is what counts."""
    itemsize = dtype.itemsize  # not torch.empty: deterministic mode cannot fill every dtype
    count = math.prod(shape) * itemsize
    raw = torch.randint(0, 256, (count,), generator=_GEN, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


_NEW_DTYPES = [
    "uint16",
    "uint32",
    "uint64",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "complex32",
    "complex64",
    "complex128",
]


@pytest.mark.parametrize("name", _NEW_DTYPES)
@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
def test_issue7_26_every_dtype_round_trips_bit_identical(tmp_path: Path, name: str) -> None:
    if not hasattr(torch, name):
        pytest.skip(f"this torch has no {name}")
    dtype = getattr(torch, name)
    plain = _random_bits(dtype, 3, 4)
    state = {
        "plain": plain,
        "transposed": _random_bits(dtype, 4, 5).t(),
        "zero-dim": _random_bits(dtype),
        "empty": _random_bits(dtype, 0, 2),
        "in-a-tuple": (_random_bits(dtype, 7),),
    }
    if dtype.is_complex:
        state["conjugated-view"] = plain.conj()  # lazily conjugated: its bytes are not yet negated
    loaded = load_snapshot(persist(state, tmp_path))
    for key, want in state.items():
        got = loaded[key][0] if key == "in-a-tuple" else loaded[key]
        want = want[0] if key == "in-a-tuple" else want
        assert (got.dtype, got.shape) == (dtype, want.shape), key
        assert torch.equal(bits(got), bits(want.resolve_conj())), key


def _numpy_leaves() -> dict[str, Any]:
    np = pytest.importorskip("numpy")
    grid = np.arange(24, dtype=np.float64).reshape(4, 6)
    return {
        "f32-scalar": np.float32(0.1),
        "f64-scalar": np.float64(1 / 3),
        "f16-scalar": np.float16(-2.5),
        "i64-scalar": np.int64(-(2**62)),
        "u64-scalar": np.uint64(2**64 - 1),
        "u16-scalar": np.uint16(65535),
        "bool-scalar": np.bool_(True),
        "c64-scalar": np.complex64(1 - 2j),
        "nan-scalar": np.float32("nan"),
        "rng": np.random.RandomState(7).get_state(),
        "u32": np.arange(10, dtype=np.uint32) * 400_000_000,
        "u64": np.array([0, 2**63, 2**64 - 1], dtype=np.uint64),
        "i8": np.array([-128, 0, 127], dtype=np.int8),
        "bool": np.array([[True, False], [False, True]]),
        "c128": np.array([1 + 1j, np.nan - 1j, -np.inf * 1j]),
        "big-endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "reversed-view": grid[::-1, ::2],
        "zero-dim": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.int16),
    }


def test_issue7_26_numpy_leaves_round_trip(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    state = _numpy_leaves()
    loaded = load_snapshot(persist({**state, "w": torch.ones(2)}, tmp_path))

    def same(got: Any, want: Any, key: str) -> None:
        assert type(got) is type(want), key
        if isinstance(want, tuple):
            for g, w in zip(got, want, strict=True):
                same(g, w, key)
        elif isinstance(want, (np.ndarray, np.generic)):
            assert (got.dtype, got.shape) == (want.dtype, want.shape), key
            assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), key
        else:
            assert got == want, key

    for key, want in state.items():
        same(loaded[key], want, key)
    # numpy's RNG state, as a resume state carries it, is accepted back and draws the same numbers.
    restored, original = np.random.RandomState(), np.random.RandomState(7)
    restored.set_state(loaded["rng"])
    assert np.array_equal(restored.random(5), original.random(5))


@pytest.mark.filterwarnings("ignore:.*quantize:UserWarning")
def test_issue7_26_unsupported_dtype_names_the_dtype_not_the_type() -> None:
    quantized = torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8)
    with pytest.raises(UnsupportedLeafError) as info:
        flatten_state({"model": {"x": quantized}})
    assert info.value.path == "model/x"
    assert "unsupported tensor dtype torch.quint8" in str(info.value)
    assert "supported: torch.Tensor" not in str(info.value)


# -- values that are not tensors -------------------------------------------------------------------

LEAVES: dict[str, Any] = {
    "none": None,
    "text": "héllo wörld",
    "empty-text": "",
    "true": True,
    "false": False,
    "int": 7,
    "big-int": 2**62 + 1,
    "negative": -3,
    "float": 0.1,
    "whole-float": 2.0,
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "empty-list": [],
    "empty-tuple": (),
    "empty-dict": {},
    "nested": [1, (2, [3, {"k": (None, "x")}]), {"deep": [[[]]]}],
    "int-keys": {0: "a", 1: "b", -1: "c", 10: {2: [None]}},
    "mixed-keys": {"s": 1, 2: 2, None: 3},
    "bool-keys": {True: "yes", False: "no"},
    "float-keys": {0.5: "half", 1.5: None},
    "tag-lookalikes": {"$tensor": "not a tensor", "$float": "nan", "$tuple": [1], "$dict": {}},
    "tuple-of-floats": (0.9, 0.999),
}


@pytest.mark.parametrize("with_tensor", [True, False], ids=["beside-a-tensor", "no-tensor-at-all"])
def test_non_tensor_leaves_round_trip(tmp_path: Path, with_tensor: bool) -> None:
    state: dict[str, Any] = dict(LEAVES)
    if with_tensor:
        state["weight"] = torch.ones(3)
    assert_same(load_snapshot(persist(state, tmp_path)), state)


def _quantized() -> torch.Tensor:
    return torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8)


# States are built inside the test, so creating a quantized tensor warns there, not at collection.
# ``named``: what the message must name: the type, or for a tensor the dtype or layout it cannot store.
@pytest.mark.parametrize(
    ("make", "path", "type_name", "named"),
    [
        pytest.param(
            lambda: {"opt": {"state": {0: {"fn": lambda: 1}}}},
            "opt/state/0/fn",
            "function",
            "function",
            id="lambda",
        ),
        pytest.param(
            lambda: {"w": torch.zeros(3).to_sparse()}, "w", "Tensor", "torch.sparse_coo", id="sparse-tensor"
        ),
        pytest.param(lambda: {"q": _quantized()}, "q", "Tensor", "torch.quint8", id="quantized-tensor"),
        pytest.param(lambda: {"ids": {1, 2}}, "ids", "set", "set", id="set"),
        pytest.param(lambda: {"raw": [0, b"bytes"]}, "raw/1", "bytes", "bytes", id="bytes-in-list"),
        pytest.param(lambda: {"t": (1, 2, object())}, "t/2", "object", "object", id="object-in-tuple"),
        pytest.param(lambda: {"d": {(1, 2): 3}}, "d/<key (1, 2)>", "tuple", "tuple", id="tuple-key"),
        pytest.param(lambda: {1, 2}, "", "set", "set", id="root"),
    ],
)
@pytest.mark.filterwarnings("ignore:.*quantize:UserWarning")
def test_unsupported_leaf_names_its_path(
    make: Callable[[], Any], path: str, type_name: str, named: str
) -> None:
    with pytest.raises(UnsupportedLeafError) as info:
        flatten_state(make())
    assert isinstance(info.value, TypeError)
    assert info.value.path == path
    assert info.value.type_name == type_name
    assert (path or "<root>") in str(info.value)
    assert named in str(info.value)


# -- slots -----------------------------------------------------------------------------------------


@pytest.fixture
def slot(tmp_path: Path) -> Any:
    s = Slot(tmp_path / "shm" / "slot-0")
    yield s
    s.unlink()


def staged(step: int) -> tuple[Any, Any, bytes]:
    tensors, skeleton = flatten_state({"w": torch.full((16,), float(step)), "step": step})
    return layout_for(tensors), tensors, encode_structure(skeleton, step)


@pytest.mark.parametrize(
    ("needed", "capacity"),
    [
        pytest.param(0, GRANULE, id="nothing"),
        pytest.param(1, GRANULE, id="one-byte"),
        pytest.param(GRANULE, GRANULE, id="exactly-one-granule"),
        pytest.param(GRANULE + 1, 2 * GRANULE, id="one-byte-over"),
    ],
)
def test_slot_capacity_is_a_multiple_of_64_mib(slot: Slot, needed: int, capacity: int) -> None:
    slot.ensure_capacity(needed)
    assert slot.capacity == capacity
    assert slot.tensors_path.stat().st_size == capacity


def test_slot_reused_when_it_fits_and_grown_when_not(slot: Slot) -> None:
    layout, tensors, structure = staged(1)
    slot.ensure_capacity(layout.total)
    slot.write(layout, tensors, structure)
    inode = slot.tensors_path.stat().st_ino

    slot.ensure_capacity(GRANULE // 2)  # fits: same file, same mapping, bytes untouched
    assert slot.capacity == GRANULE
    assert slot.tensors_path.stat().st_ino == inode
    with slot.tensors_path.open("rb") as handle:
        assert handle.read(layout.total)[: len(layout.header)] == layout.header

    slot.ensure_capacity(GRANULE + 1)  # does not fit: grown to the next multiple
    assert slot.capacity == 2 * GRANULE
    assert slot.tensors_path.stat().st_size == 2 * GRANULE
    layout, tensors, structure = staged(2)
    slot.write(layout, tensors, structure)
    with slot.tensors_path.open("rb") as handle:
        assert handle.read(layout.total)[: len(layout.header)] == layout.header


def _unlink_file(slot: Slot) -> None:
    slot.tensors_path.unlink()


def _remove_folder(slot: Slot) -> None:
    shutil.rmtree(slot.directory)  # what the daemon does with idle slots


@pytest.mark.parametrize("remove", [_unlink_file, _remove_folder], ids=["file-unlinked", "folder-removed"])
def test_slot_recreated_when_someone_else_removed_it(
    slot: Slot, tmp_path: Path, remove: Callable[[Slot], None]
) -> None:
    slot.ensure_capacity(1000)
    remove(slot)

    layout, tensors, structure = staged(5)
    slot.ensure_capacity(layout.total)
    slot.write(layout, tensors, structure)
    # The bytes reach a file a reader can open, not an orphaned mapping.
    with slot.tensors_path.open("rb") as handle:
        assert handle.read(len(layout.header)) == layout.header
    assert (slot.directory / STRUCTURE_FILE).read_bytes() == structure


def test_slot_unlink_removes_its_files(slot: Slot) -> None:
    slot.ensure_capacity(10)
    slot.unlink()
    assert not slot.directory.exists()
    assert slot.capacity == 0


# -- load_snapshot on something that is not a checkpoint -------------------------------------------


@pytest.mark.parametrize(
    "present",
    [
        pytest.param(None, id="no-directory"),
        pytest.param((), id="empty-directory"),
        pytest.param((TENSORS_FILE,), id="only-tensors"),
        pytest.param((STRUCTURE_FILE,), id="only-structure"),
    ],
)
def test_load_snapshot_without_its_files_is_file_not_found(
    tmp_path: Path, present: tuple[str, ...] | None
) -> None:
    directory = tmp_path / "step-00000010"
    if present is not None:
        directory.mkdir()
        for name in present:
            (directory / name).write_bytes(b"{}")
    with pytest.raises(FileNotFoundError) as info:
        load_snapshot(directory)
    message = str(info.value)
    assert str(directory) in message
    assert TENSORS_FILE in message and STRUCTURE_FILE in message


# -- the client with no daemon ---------------------------------------------------------------------


def _state_fn() -> Any:
    raise AssertionError("the state function must not be called when no daemon is alive")


def _no_setup(run: Path) -> None:
    run.mkdir()


def _missing_run_dir(run: Path) -> None:
    pass


def _dead_daemon_with_a_request(run: Path) -> None:
    """A daemon that asked for step 100 and every 50 steps, then died a minute ago."""
    paths = RunPaths(run)
    paths.meta.mkdir(parents=True)
    write_control(
        paths,
        Control(
            seq=3,
            run_id="r",
            staging=str(run.parent / "shm" / "ckptd-r"),
            every_steps=50,
            verdict=Verdict(100, "snapshot", ("best:eval_loss",), metrics={"eval_loss": 0.1}),
            written=time.time() + 3600,  # after the client started: a verdict meant for it
        ),
    )
    paths.status.write_text("{}")
    stale = time.time() - 60
    os.utime(paths.status, (stale, stale))


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.parent.rglob("*"))


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(_no_setup, id="empty-run-dir"),
        pytest.param(_missing_run_dir, id="run-dir-missing"),
        pytest.param(_dead_daemon_with_a_request, id="stale-heartbeat"),
    ],
)
def test_client_without_a_daemon_is_a_silent_no_op(tmp_path: Path, setup: Callable[[Path], None]) -> None:
    run = tmp_path / "run"
    setup(run)
    before = _tree(run)
    with CheckpointClient(run, rendezvous_timeout=5.0) as client:
        for step in range(0, 301, 50):
            assert client.maybe_snapshot(step, _state_fn) is False
            started = time.monotonic()
            assert client.wait_verdict(step) is None
            assert client.wait_verdict(step, timeout=5.0) is None
            assert time.monotonic() - started < 0.1
    assert _tree(run) == before
