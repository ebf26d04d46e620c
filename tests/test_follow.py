"""LogFollower and ChangeWatcher on real files: appends, truncation, rotation, deletion, resume."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckptd.logs import ChangeWatcher, Cursor, LogFollower


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "logging.jsonl"


@pytest.fixture
def follower(log: Path) -> Iterator[LogFollower]:
    f = LogFollower(log)
    yield f
    f.close()


def test_missing_file_reads_nothing_then_reads_from_start(log: Path, follower: LogFollower) -> None:
    assert follower.read_lines() == []
    assert follower.cursor is None
    log.write_bytes(b"one\ntwo\n")
    assert follower.read_lines() == [b"one", b"two"]
    assert follower.read_lines() == []
    assert follower.cursor == Cursor(log.stat().st_ino, 8, b"one\ntwo\n".hex())


def test_partial_line_is_held_until_its_newline(log: Path, follower: LogFollower) -> None:
    log.write_bytes(b"a\r\nhal")
    assert follower.read_lines() == [b"a"]
    assert follower.cursor is not None and follower.cursor.offset == 3
    append(log, b"f")
    assert follower.read_lines() == []
    append(log, b"\r\nb\n")
    assert follower.read_lines() == [b"half", b"b"]


def test_line_written_one_byte_at_a_time_comes_back_once(log: Path, follower: LogFollower) -> None:
    got: list[bytes] = []
    for byte in b"ab\n\ncd\n":
        append(log, bytes([byte]))
        got += follower.read_lines()
    assert got == [b"ab", b"", b"cd"]


def test_lines_across_read_chunks_stay_whole(log: Path, follower: LogFollower) -> None:
    # 2.6 MB: more than two 1 MiB reads, so lines straddle chunk boundaries.
    lines = [f'{{"step": {i}, "loss": {i / 7:.12f}}}'.encode() for i in range(60_000)]
    log.write_bytes(b"\n".join(lines) + b"\n")
    assert follower.read_lines() == lines
    assert follower.cursor is not None and follower.cursor.offset == log.stat().st_size


def test_copytruncate_rereads_from_start_and_drops_the_partial(log: Path, follower: LogFollower) -> None:
    log.write_bytes(b"one\ntwo\npart")
    assert follower.read_lines() == [b"one", b"two"]
    inode = log.stat().st_ino
    with open(log, "r+b") as f:  # what logrotate's copytruncate does
        f.truncate(0)
    assert follower.read_lines() == []
    append(log, b"x\n")
    assert follower.read_lines() == [b"x"]
    assert log.stat().st_ino == inode
    assert follower.rewinds == 1


def test_truncation_inside_the_held_partial_rewinds(log: Path, follower: LogFollower) -> None:
    # Past the 64-byte head, so only the size tells that bytes already read are gone.
    first = b"L" * 70
    log.write_bytes(first + b"\npart")
    assert follower.read_lines() == [first]
    with open(log, "r+b") as f:
        f.truncate(len(first) + 1)
    assert follower.read_lines() == [first]
    append(log, b"full\n")
    assert follower.read_lines() == [b"full"]
    assert follower.rewinds == 1


def test_truncated_and_regrown_past_offset_is_caught_by_head(log: Path, follower: LogFollower) -> None:
    log.write_bytes(b"old\n")
    assert follower.read_lines() == [b"old"]
    with open(log, "r+b") as f:  # same inode, longer, and a line still starts at byte 4
        f.truncate(0)
        f.write(b"new\nmore\n")
    assert follower.read_lines() == [b"new", b"more"]
    assert follower.rewinds == 1


def test_regrown_with_same_head_but_no_line_start_at_offset_rewinds(log: Path, follower: LogFollower) -> None:
    # The first 64 bytes match, but the old offset now falls inside a line.
    log.write_bytes(b"A" * 70 + b"\n")
    assert follower.read_lines() == [b"A" * 70]
    with open(log, "r+b") as f:
        f.truncate(0)
        f.write(b"A" * 80 + b"\ntail\n")
    assert follower.read_lines() == [b"A" * 80, b"tail"]
    assert follower.rewinds == 1


def test_rename_rotation_drains_old_file_then_reads_new(log: Path, follower: LogFollower) -> None:
    log.write_bytes(b"a\nb\n")
    assert follower.read_lines() == [b"a", b"b"]
    rotated = log.with_name("logging.jsonl.1")
    os.rename(log, rotated)
    append(rotated, b"c\nd")  # written late to the old file, last line unterminated
    log.write_bytes(b"e\n")
    assert follower.read_lines() == [b"c", b"e"]
    assert follower.cursor == Cursor(log.stat().st_ino, 2, b"e\n".hex())
    # The old file is finished once it has been quiet: then its unterminated last line counts.
    quick = LogFollower(log, rotation_quiet_s=0)
    assert quick.read_lines() == [b"e"]
    os.rename(log, log.with_name("e.1"))
    append(log.with_name("e.1"), b"f")
    log.write_bytes(b"g\n")
    assert quick.read_lines() == [b"g", b"f"]
    quick.close()
    assert follower.rewinds == 0


def test_deleted_file_is_read_while_written_then_replacement_from_start(
    log: Path, follower: LogFollower
) -> None:
    log.write_bytes(b"a\n")
    assert follower.read_lines() == [b"a"]
    with open(log, "ab", buffering=0) as writer:
        log.unlink()
        writer.write(b"b\nc")  # the writer still holds the unlinked file
        assert follower.read_lines() == [b"b"]
        assert follower.read_lines() == []
    log.write_bytes(b"new\n")
    # The old file is finished once another takes its name and it is quiet: its last line counts.
    assert follower.read_lines() == [b"new"]
    follower.rotation_quiet_s = 0  # as if it had been quiet for long
    assert follower.read_lines() == [b"c"]
    assert follower.rewinds == 0


def test_close_then_read_resumes_where_it_stopped(log: Path, follower: LogFollower) -> None:
    log.write_bytes(b"a\nb")
    assert follower.read_lines() == [b"a"]
    follower.close()
    follower.close()
    append(log, b"\nc\n")
    assert follower.read_lines() == [b"b", b"c"]
    assert follower.rewinds == 0


def _grow(path: Path) -> None:
    append(path, b"new\n")


def _truncate(path: Path) -> None:
    path.write_bytes(b"new\n")  # opened "wb": same inode, shorter than the offset


def _replace(path: Path) -> None:
    # Same bytes plus one line, but another inode: a different file.
    tmp = path.with_name("tmp")
    tmp.write_bytes(b"first\nsecond\nnew\n")
    os.replace(tmp, path)


def _rewrite_head(path: Path) -> None:
    path.write_bytes(b"FIRST\nsecond\nnew\n")  # same inode, longer, other first bytes


@pytest.mark.parametrize(
    ("change", "expected", "rewinds"),
    [
        (_grow, [b"new"], 0),
        (_truncate, [b"new"], 1),
        (_replace, [b"first", b"second", b"new"], 1),
        (_rewrite_head, [b"FIRST", b"second", b"new"], 1),
    ],
)
def test_resume_from_cursor(
    log: Path, change: Callable[[Path], None], expected: list[bytes], rewinds: int
) -> None:
    log.write_bytes(b"first\nsecond\n")
    before = LogFollower(log)
    assert before.read_lines() == [b"first", b"second"]
    assert before.cursor is not None
    cursor = Cursor.from_json(json.loads(json.dumps(before.cursor.to_json())))
    before.close()
    change(log)
    after = LogFollower(log, cursor=cursor)
    try:
        assert after.read_lines() == expected
        assert after.rewinds == rewinds
        data = log.read_bytes()
        assert after.cursor == Cursor(log.stat().st_ino, len(data), data[:64].hex())
    finally:
        after.close()


def test_resume_cursor_is_kept_until_the_file_appears(log: Path) -> None:
    cursor = Cursor(inode=1, offset=4, head=b"abc\n".hex())
    follower = LogFollower(log, cursor=cursor)
    try:
        assert follower.read_lines() == []
        assert follower.cursor == cursor
        log.write_bytes(b"x\n")
        assert follower.read_lines() == [b"x"]
        assert follower.rewinds == 1
    finally:
        follower.close()


def test_cursor_whose_head_does_not_cover_its_offset_is_not_trusted(log: Path) -> None:
    log.write_bytes(b"first\nsecond\n")
    cursor = Cursor(inode=log.stat().st_ino, offset=6, head="")
    follower = LogFollower(log, cursor=cursor)
    try:
        assert follower.read_lines() == [b"first", b"second"]
        assert follower.rewinds == 1
    finally:
        follower.close()


def test_cursor_head_is_capped_at_64_bytes(log: Path, follower: LogFollower) -> None:
    data = b"".join(b"line %03d\n" % i for i in range(20))
    log.write_bytes(data[:40])  # the head is built across reads
    assert len(follower.read_lines()) == 4
    append(log, data[40:])
    assert len(follower.read_lines()) == 16
    cursor = follower.cursor
    assert cursor is not None
    assert cursor.head == data[:64].hex()
    assert Cursor.from_json(cursor.to_json()) == cursor


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"inode": 1, "offset": 0},
        {"inode": True, "offset": 0, "head": ""},
        {"inode": 1, "offset": -1, "head": ""},
        {"inode": 1, "offset": 1.0, "head": ""},
        {"inode": "1", "offset": 0, "head": ""},
        {"inode": 1, "offset": 0, "head": "zz"},
        {"inode": 1, "offset": 0, "head": 5},
        {"inode": 1, "offset": 0, "head": "00" * 65},
    ],
)
def test_cursor_from_json_rejects_bad_data(data: object) -> None:
    with pytest.raises(ValueError):
        Cursor.from_json(data)  # type: ignore[arg-type]


def test_long_lines_are_skipped_and_counted_and_warned_once(
    log: Path, caplog: pytest.LogCaptureFixture
) -> None:
    follower = LogFollower(log, max_line_bytes=8)
    try:
        with caplog.at_level(logging.WARNING, logger="ckptd.logs"):
            log.write_bytes(b"12345678\n" + b"x" * 9 + b"\nok\n")
            assert follower.read_lines() == [b"12345678", b"ok"]
            assert follower.skipped_long_lines == 1
            # An unterminated line past the bound is dropped as it grows, not buffered.
            append(log, b"y" * 5)
            assert follower.read_lines() == []
            append(log, b"y" * 10)
            assert follower.read_lines() == []
            assert follower.skipped_long_lines == 2
            append(log, b"y" * 100 + b"yy\naft")
            assert follower.read_lines() == []
            assert follower.cursor is not None
            assert follower.cursor.offset == log.stat().st_size - 3  # at "aft", past the long line
            append(log, b"er\n")
            assert follower.read_lines() == [b"after"]
        assert follower.skipped_long_lines == 2
        warnings = [r for r in caplog.records if r.name == "ckptd.logs"]
        assert len(warnings) == 1
        assert str(log) in warnings[0].getMessage()
    finally:
        follower.close()


def test_long_line_resumes_at_its_start_after_restart(log: Path) -> None:
    log.write_bytes(b"ok\n" + b"z" * 20)
    before = LogFollower(log, max_line_bytes=8)
    assert before.read_lines() == [b"ok"]
    cursor = before.cursor
    before.close()
    assert cursor is not None and cursor.offset == 3
    append(log, b"\nnext\n")
    after = LogFollower(log, cursor=cursor, max_line_bytes=8)
    try:
        assert after.read_lines() == [b"next"]
        assert (after.rewinds, after.skipped_long_lines) == (0, 1)
    finally:
        after.close()


@pytest.fixture
def woken() -> threading.Event:
    return threading.Event()


@pytest.fixture(params=[False, True], ids=["inotify", "polling"])
def poll(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _watcher(path: Path, woken: threading.Event, poll: bool) -> ChangeWatcher:
    watcher = ChangeWatcher(path, woken.set, poll=poll, poll_interval=0.02)
    watcher.start()
    return watcher


def test_watcher_wakes_on_append(log: Path, woken: threading.Event, poll: bool) -> None:
    log.write_bytes(b"a\n")
    watcher = _watcher(log, woken, poll)
    try:
        assert watcher.mode == ("polling" if poll else "inotify")
        assert not woken.wait(0.1)  # nothing changed yet
        append(log, b"b\n")
        assert woken.wait(2)
    finally:
        watcher.stop()


def test_watcher_wakes_when_file_is_created_late(log: Path, woken: threading.Event, poll: bool) -> None:
    watcher = _watcher(log, woken, poll)
    try:
        log.write_bytes(b"a\n")
        assert woken.wait(2)
    finally:
        watcher.stop()


def test_watcher_ignores_other_files_in_the_directory(log: Path, woken: threading.Event, poll: bool) -> None:
    log.write_bytes(b"a\n")
    watcher = _watcher(log, woken, poll)
    try:
        (log.parent / "other.txt").write_bytes(b"noise\n")
        assert not woken.wait(0.2)
    finally:
        watcher.stop()


def test_directory_watcher_wakes_on_a_file_renamed_into_it(
    tmp_path: Path, woken: threading.Event, poll: bool
) -> None:
    acks = tmp_path / "acks"
    acks.mkdir()
    watcher = ChangeWatcher(acks, woken.set, poll=poll, poll_interval=0.02, children=True)
    watcher.start()
    try:
        (tmp_path / "sibling.json").write_bytes(b"{}")
        assert not woken.wait(0.2)  # outside the directory: no wake
        (acks / ".12.json.tmp").write_bytes(b"{}")
        os.rename(acks / ".12.json.tmp", acks / "12.json")  # how an ack lands
        assert woken.wait(2)
    finally:
        watcher.stop()


def test_watcher_stop_joins_its_threads_and_is_idempotent(
    log: Path, woken: threading.Event, poll: bool
) -> None:
    threads_before = set(threading.enumerate())
    watcher = _watcher(log, woken, poll)
    assert set(threading.enumerate()) > threads_before
    watcher.stop()
    watcher.stop()
    assert set(threading.enumerate()) <= threads_before
    log.write_bytes(b"a\n")
    assert not woken.wait(0.2)


def test_issue7_22_missing_parent_is_waited_for_with_inotify(
    tmp_path: Path, woken: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    # A folder that does not exist yet is no reason to poll: its nearest ancestor is watched.
    log = tmp_path / "later" / "deeper" / "logging.jsonl"
    with caplog.at_level(logging.INFO, logger="ckptd.logs"):
        watcher = _watcher(log, woken, False)
    try:
        assert watcher.mode == f"inotify (waiting for {log} to appear)"
        assert "unavailable" not in caplog.text
        log.parent.mkdir(parents=True)
        assert woken.wait(2)  # the watch moved down to the new folder, and said so
        woken.clear()
        log.write_bytes(b"a\n")
        assert woken.wait(2)
        assert watcher.mode == "inotify"
    finally:
        watcher.stop()


def test_a_line_source_reports_over_long_lines_with_the_malformed_ones(log: Path) -> None:
    from ckptd.logs import JsonlFormat, LineSource

    log.write_bytes(b'{"step": 1, "eval_loss": 0.5}\n' + b"x" * 100 + b"\n{not json\n")
    source = LineSource(log, JsonlFormat(), max_line_bytes=64)
    assert [e.step for e in source.read_events()] == [1]
    assert source.malformed.counts == {"too-long": 1, "json": 1}
