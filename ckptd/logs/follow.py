"""Following one log file that grows: every complete line once, across restarts and rotation.

The trainer appends to its log; the daemon reads what is new. :class:`LogFollower` turns
"what is new" into whole lines and keeps a :class:`Cursor`, so a restarted daemon resumes
where it stopped instead of judging old evals again. It copes with what happens to log
files in practice: the file not existing yet, a half-written last line, copytruncate,
rename-rotation, deletion, and truncate-then-regrow. :class:`ChangeWatcher` only says
*when* to look (inotify through watchdog, or polling where inotify is unavailable).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.utils import UnsupportedLibcError

logger = logging.getLogger("ckptd.logs")

_CHUNK = 1 << 20
_HEAD_BYTES = 64
# A rotated file is read until it has been quiet this long: a writer may still append to it
# until it reopens its log by name, and those lines belong to the run as much as any other.
ROTATION_QUIET_S = 2.0


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class Cursor:
    """Where reading stopped: enough to resume after a daemon restart.

    ``head`` is the hex of the file's first ``min(64, bytes read)`` bytes; with the inode it
    tells "the same file, grown" from "another file at the same name" or "truncated and
    written again past the offset".
    """

    inode: int
    offset: int
    head: str

    def to_json(self) -> dict[str, object]:
        return {"inode": self.inode, "offset": self.offset, "head": self.head}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Cursor:
        """Rebuild a cursor from :meth:`to_json` output; ``ValueError`` on anything else."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a log cursor must be an object, not {type(data).__name__}")
        inode, offset, head = data.get("inode"), data.get("offset"), data.get("head")
        if not _is_count(inode):
            raise ValueError(f"log cursor inode must be an integer >= 0, not {inode!r}")
        if not _is_count(offset):
            raise ValueError(f"log cursor offset must be an integer >= 0, not {offset!r}")
        if not isinstance(head, str):
            raise ValueError(f"log cursor head must be a hex string, not {head!r}")
        try:
            raw = bytes.fromhex(head)
        except ValueError as exc:
            raise ValueError(f"log cursor head is not hex: {head!r}") from exc
        if len(raw) > _HEAD_BYTES:
            raise ValueError(f"log cursor head holds {len(raw)} bytes, more than {_HEAD_BYTES}")
        return cls(inode, offset, raw.hex())  # type: ignore[arg-type]


@dataclass(frozen=True)
class HistoryEnd:
    """Where the history of a log ends: the file (device, inode) and its size when the source opened.

    Complete lines wholly before ``size`` are history (read to establish bests, never judged as
    news); everything after it, including a line that crosses it, is live.
    """

    dev: int
    ino: int
    size: int


def history_end_at(path: Path, cursor: Cursor | None = None) -> HistoryEnd | None:
    """The history boundary of the file at ``path`` now; None when there is no history to read
    (no file, a directory, an empty file, or a cursor already at or past the end)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return None
    if cursor is not None and cursor.inode == st.st_ino and cursor.offset >= st.st_size:
        return None
    return HistoryEnd(st.st_dev, st.st_ino, st.st_size)


class _Rotated:
    """A file that lost its name to a new one but may still be written: read until quiet.

    Holds only what is needed to cut its new bytes into whole lines; its lines are never part
    of the cursor (a restarted daemon cannot find a renamed file again).
    """

    def __init__(self, fd: int, pos: int, partial: bytes, discarding: bool, now: float) -> None:
        self.fd = fd
        self.pos = pos
        self.partial = bytearray(partial)
        self.discarding = discarding
        self.last_growth = now
        self.grew_later = False  # grew after the read that found it rotated
        self.ident = (0, 0)  # (st_dev, st_ino), as put in DRAINED

    def size(self) -> int:
        return os.fstat(self.fd).st_size


class _DrainedFiles:
    """Files that followers still read but that no longer bear their log's name: a rotated file
    read until quiet, or the held file renamed away with nothing at the log's path yet.

    The writer may append to them until it reopens its log, so a :class:`ChangeWatcher` wakes
    on their changes too (they are named otherwise than its target) and watches their folders
    when those are not the log's own. Shared by every follower and watcher of the process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[tuple[int, int], tuple[str, int]] = {}  # identity -> (path, holders)
        self._listeners: list[Callable[[], None]] = []

    def add(self, ident: tuple[int, int], fd: int) -> None:
        with self._lock:
            path, holders = self._files.get(ident, (_fd_path(fd), 0))
            self._files[ident] = (path, holders + 1)
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def discard(self, ident: tuple[int, int]) -> None:
        with self._lock:
            path, holders = self._files.pop(ident, ("", 0))
            if holders > 1:
                self._files[ident] = (path, holders - 1)
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def __bool__(self) -> bool:
        return bool(self._files)

    def holds(self, path: str) -> bool:
        """Whether the file now at ``path`` is one of them (a stat: call only when there are some)."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) in self._files

    def paths(self) -> list[str]:
        """Where they were when they became drained (absolute; a deleted one is named so)."""
        with self._lock:
            return [path for path, _ in self._files.values() if os.path.isabs(path)]

    def subscribe(self, listener: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)


DRAINED = _DrainedFiles()


class LogFollower:
    """Returns the complete lines appended to one file since the previous call.

    Not thread-safe: one caller polls :meth:`read_lines` (typically when a
    :class:`ChangeWatcher` wakes it). Lines come back without ``\\n`` (and without a
    trailing ``\\r``); a line is never returned half, and never twice except after a rewind.
    """

    def __init__(
        self,
        path: Path,
        cursor: Cursor | None = None,
        max_line_bytes: int = 1 << 20,
        *,
        history: HistoryEnd | bool | None = True,
        rotation_quiet_s: float = ROTATION_QUIET_S,
    ) -> None:
        """``history``: True takes the boundary from the file at ``path`` now; a
        :class:`HistoryEnd` (or None: no history) is given by a source re-opened on the same log."""
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be >= 1, not {max_line_bytes}")
        self.path = Path(path)
        self._history = history_end_at(self.path, cursor) if history is True else history or None
        self.history_end = self._history  # kept after the history is read, to reopen the same log
        self.rotation_quiet_s = rotation_quiet_s
        self._rotated: list[_Rotated] = []
        self._grew_since_rotation = True
        self._drained: set[tuple[int, int]] = set()  # identities this follower put in DRAINED
        self._lost_at: int | None = None  # size of the held file when its name was found gone
        self.stalled_note: str | None = None  # set while a rotated file grows and the new one does not
        self.special_note: str | None = None  # set while a FIFO, socket or device is at the path
        self.rewinds = 0
        self.skipped_long_lines = 0
        self.at_end = True  # False when the last read_blocks stopped before the end of the file
        self._max_line = max_line_bytes
        self._resume = cursor  # checked against the file when it is first opened
        self._fd: int | None = None
        self._ident = (0, 0)  # (st_dev, st_ino) of the held fd
        self._inode: int | None = None  # of the file the position below refers to
        self._seen: tuple[int, int] | None = None  # (size, mtime_ns) last acted on
        self._read_pos = 0  # bytes read from the held file
        self._line_start = 0  # where the first line not yet returned starts
        self._head = b""  # the file's first min(64, _read_pos) bytes
        self._partial = bytearray()  # bytes of an unterminated line, from _line_start
        self._discarding = False  # inside an over-long line, dropping bytes until "\n"
        self._warned = False

    @property
    def cursor(self) -> Cursor | None:
        """Where to resume: ``None`` until a file is seen, unless a cursor was given to resume."""
        if self._resume is not None:
            return self._resume
        if self._inode is None:
            return None
        return Cursor(self._inode, self._line_start, self._head.hex())

    def read_lines(self) -> list[bytes]:
        """Every complete line added since the last call (``[]`` while the file is missing)."""
        lines: list[bytes] = []
        while blocks := self.read_blocks():
            for block in blocks:
                lines += self.lines_in(block)
        return lines

    def read_blocks(self, max_bytes: int = _CHUNK) -> list[bytes]:
        """Complete new lines as blocks (lines joined by ``\n``), about ``max_bytes`` per call.

        Call until it returns ``[]``. A block is what a reader that only wants some lines
        can search at C speed without making a Python object of every line; the memory a
        call takes is bounded, so catching up on a huge log stays small.
        """
        at_path = self._identity_at_path()
        blocks = self._read_rotated()
        if self._fd is not None and at_path is not None and at_path != self._ident:
            # Another file took the name (rename-rotation, a symlink pointed elsewhere, or
            # deleted and recreated): read the held one to its end, and keep reading it until
            # it is quiet, since the writer may append to it until it reopens the log by name.
            # Watched from before that read, so a line written after it wakes the daemon.
            self._mark_drained(self._ident)
            blocks += self._read_new(final=False, max_bytes=None)
            self._retire_fd()
        self.at_end = True
        if self._fd is None and (at_path is None or not self._open()):
            self._update_stalled_note()
            return blocks
        self._track_name(at_path)
        new = self._read_new(final=False, max_bytes=max_bytes)
        self._grew_since_rotation |= bool(new)
        self._update_stalled_note()
        return blocks + new

    @property
    def history_done(self) -> bool:
        """True once every complete line before the history boundary was returned."""
        end = self._history
        if end is not None and self._fd is not None and self._ident == (end.dev, end.ino):
            return self._read_pos >= end.size  # read_blocks may have read past it
        return end is None

    def read_history_blocks(self, max_bytes: int = _CHUNK) -> list[bytes]:
        """Like :meth:`read_blocks`, but only lines that end before the history boundary.

        The line crossing the boundary stays partial, so :meth:`read_blocks` returns it as new.
        Once the boundary is reached (or cannot be: the file is gone, shrank, or is another
        file now) :attr:`history_done` is True and this returns ``[]``.
        """
        end = self._history
        if end is None:
            return []
        if self._fd is None and (self._identity_at_path() != (end.dev, end.ino) or not self._open()):
            self._history = None  # the history file is no longer there: nothing left to read
            return []
        if self._ident != (end.dev, end.ino):
            self._history = None
            return []
        rewinds = self.rewinds
        blocks = self._read_new(final=False, max_bytes=max_bytes, stop=end.size)
        if self._read_pos >= end.size or self.at_end or self.rewinds != rewinds:
            self._history = None  # reached, or the file shrank under us: the rest is live
            self.at_end = False  # what lies past the boundary is for read_blocks
        return blocks

    def lag_bytes(self) -> int:
        """Bytes written to the followed file (and a rotated one still read) but not read yet."""
        lag = sum(max(0, r.size() - r.pos) for r in self._rotated)
        if self._fd is not None:
            return lag + max(0, os.fstat(self._fd).st_size - self._read_pos)
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return lag
        return lag + (st.st_size if stat.S_ISREG(st.st_mode) else 0)

    def lines_in(self, block: bytes) -> list[bytes]:
        """The lines of a block, over-long ones skipped and counted."""
        return [line for line in map(self.accept, block.split(b"\n")) if line is not None]

    def accept(self, line: bytes) -> bytes | None:
        """``line`` without a trailing ``\r``, or None (counted) when it is over the bound."""
        if len(line) > self._max_line:
            self._skip_long_line()
            return None
        return line[:-1] if line.endswith(b"\r") else line

    def close(self) -> None:
        """Release the file; a later :meth:`read_lines` resumes from :attr:`cursor`."""
        for rotated in self._rotated:
            os.close(rotated.fd)
        self._rotated.clear()
        for ident in self._drained:
            DRAINED.discard(ident)
        self._drained.clear()
        self._lost_at = None
        if self._fd is not None:
            self._resume = self.cursor
            self._close_fd()

    def _identity_at_path(self) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the file at the path; None when there is none, or a directory is
        there (``rm log; mkdir log``): that is "no log yet", never something to read."""
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISDIR(st.st_mode):
            return None
        if not stat.S_ISREG(st.st_mode):
            # A FIFO would block the daemon in open() for good, a device never ends: only
            # regular files are logs. Said once; the path is watched in case a file replaces it.
            self._refuse_special(st.st_mode)
            return None
        self.special_note = None
        return (st.st_dev, st.st_ino)

    def _refuse_special(self, mode: int) -> None:
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        if self.special_note is None:
            self.special_note = f"{self.path} is {kind}, not a regular file: ckptd follows files only"
            logger.warning("%s", self.special_note)

    def _open(self) -> bool:
        try:
            # O_NONBLOCK: a FIFO put there since the stat must not block the open.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False  # removed between the stat and the open
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced by a directory or a FIFO since the stat
            os.close(fd)
            return False
        self._fd, self._ident, self._inode, self._seen = fd, (st.st_dev, st.st_ino), st.st_ino, None
        self._reset()
        cursor, self._resume = self._resume, None
        if cursor is not None and not self._resume_at(cursor, st.st_size):
            self.rewinds += 1
        return True

    def _resume_at(self, cursor: Cursor, size: int) -> bool:
        """Position at ``cursor`` if it describes the open file; False if it does not."""
        head = bytes.fromhex(cursor.head)
        if (
            cursor.inode != self._inode
            or size < cursor.offset
            or len(head) < min(_HEAD_BYTES, cursor.offset)
            or not self._at_line_boundary(cursor.offset)
        ):
            return False
        current = os.pread(self._require_fd(), _HEAD_BYTES, 0)
        if not current.startswith(head):
            return False
        self._read_pos = self._line_start = cursor.offset
        self._head = current[: min(_HEAD_BYTES, cursor.offset)]
        return True

    def _read_new(self, *, final: bool, max_bytes: int | None, stop: int | None = None) -> list[bytes]:
        st = os.fstat(self._require_fd())
        blocks: list[bytes] = []
        # Size and mtime unchanged since the file was last read to its end: nothing to read.
        if (st.st_size, st.st_mtime_ns) != self._seen:
            if not self._same_content(st.st_size):
                self.rewinds += 1
                self._reset()
            self.at_end = self._read_to_eof(blocks, max_bytes, stop)
            if self.at_end:
                self._seen = (st.st_size, st.st_mtime_ns)
        if final:
            self._flush_partial(blocks)
        return blocks

    def _same_content(self, size: int) -> bool:
        """False after copytruncate, or truncation and regrowth past what was read."""
        if size < self._read_pos:
            return False
        if self._head and os.pread(self._require_fd(), len(self._head), 0) != self._head:
            return False
        return self._at_line_boundary(self._line_start)

    def _at_line_boundary(self, offset: int) -> bool:
        # A position that does not follow a newline cannot be where a line starts: the
        # file was rewritten even if its first bytes happen to be the same.
        return offset == 0 or os.pread(self._require_fd(), 1, offset - 1) == b"\n"

    def _read_to_eof(self, blocks: list[bytes], max_bytes: int | None, stop: int | None = None) -> bool:
        """Read on, up to about ``max_bytes`` (and not past ``stop``); True at the end of the file."""
        fd = self._require_fd()
        budget = max_bytes
        while budget is None or budget > 0:
            want = _CHUNK if stop is None else min(_CHUNK, stop - self._read_pos)
            if want <= 0:
                return False  # at the boundary: the rest is for the next reader
            data = os.pread(fd, want, self._read_pos)
            if not data:
                return True
            if self._read_pos < _HEAD_BYTES:
                self._head += data[: _HEAD_BYTES - self._read_pos]
            self._feed(data, blocks)
            self._read_pos += len(data)
            if len(data) < want:
                return True
            if budget is not None:
                budget -= len(data)
        return False

    def _feed(self, data: bytes, blocks: list[bytes]) -> None:
        """Cut one chunk read at ``self._read_pos`` into a block of lines and the unterminated rest."""
        start = 0
        if self._discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return
            self._discarding = False
            start = newline + 1
            self._line_start = self._read_pos + start
        last = data.rfind(b"\n", start)
        if last < 0:
            self._partial += data[start:]
        else:
            blocks.append(bytes(self._partial) + data[start:last])
            self._partial = bytearray(data[last + 1 :])
            self._line_start = self._read_pos + last + 1
        if len(self._partial) > self._max_line:
            # Bound the memory a line without end can take: drop it up to its newline.
            self._skip_long_line()
            self._partial.clear()
            self._discarding = True

    def _flush_partial(self, blocks: list[bytes]) -> None:
        if self._partial:
            blocks.append(bytes(self._partial))
        self._partial.clear()
        self._discarding = False
        self._line_start = self._read_pos

    def _skip_long_line(self) -> None:
        self.skipped_long_lines += 1
        if not self._warned:
            self._warned = True
            logger.warning(
                "%s: skipped a line longer than %d bytes (max_line_bytes); further ones are only counted",
                self.path,
                self._max_line,
            )

    def _reset(self) -> None:
        self._read_pos = self._line_start = 0
        self._head = b""
        self._partial.clear()
        self._discarding = False

    def _track_name(self, at_path: tuple[int, int] | None) -> None:
        """Notice the held file losing its name with nothing in its place (``mv log log.1``, the
        writer never reopening): it is still the one read, but watched by its new name."""
        if at_path == self._ident:
            if self._lost_at is not None:
                self._lost_at = None
                self._unmark_drained(self._ident)
        elif self._lost_at is None:
            self._lost_at = os.fstat(self._require_fd()).st_size
            self._mark_drained(self._ident)

    def _mark_drained(self, ident: tuple[int, int]) -> None:
        if ident not in self._drained:
            self._drained.add(ident)
            DRAINED.add(ident, self._require_fd())

    def _unmark_drained(self, ident: tuple[int, int]) -> None:
        if ident in self._drained:
            self._drained.discard(ident)
            DRAINED.discard(ident)

    def _retire_fd(self) -> None:
        """Move the held file aside to be read until quiet; the next read opens the new one."""
        fd = self._require_fd()
        rotated = _Rotated(fd, self._read_pos, bytes(self._partial), self._discarding, time.monotonic())
        # A file that lost its name and grew since is a writer still on it, new file or not.
        lost_at, self._lost_at = self._lost_at, None
        rotated.grew_later = lost_at is not None and rotated.size() > lost_at
        rotated.ident = self._ident
        self._rotated.append(rotated)
        self._fd = None
        self._partial.clear()
        self._discarding = False
        self._grew_since_rotation = False

    def _read_rotated(self) -> list[bytes]:
        """New lines of rotated files; one quiet for ``rotation_quiet_s`` is finished and closed."""
        blocks: list[bytes] = []
        now = time.monotonic()
        for rotated in list(self._rotated):
            if self._drain(rotated, blocks):
                rotated.last_growth, rotated.grew_later = now, True
            elif now - rotated.last_growth >= self.rotation_quiet_s:
                if rotated.partial and not rotated.discarding:
                    blocks.append(bytes(rotated.partial))  # its unterminated last line
                os.close(rotated.fd)
                self._rotated.remove(rotated)
                if not any(r.ident == rotated.ident for r in self._rotated):
                    self._unmark_drained(rotated.ident)
        return blocks

    def _drain(self, rotated: _Rotated, blocks: list[bytes]) -> bool:
        """Append the complete new lines of ``rotated`` to ``blocks``; True when it grew."""
        grew = False
        while data := os.pread(rotated.fd, _CHUNK, rotated.pos):
            grew = True
            rotated.pos += len(data)
            if rotated.discarding:
                newline = data.find(b"\n")
                if newline < 0:
                    continue
                rotated.discarding, data = False, data[newline + 1 :]
            last = data.rfind(b"\n")
            if last < 0:
                rotated.partial += data
            else:
                blocks.append(bytes(rotated.partial) + data[:last])
                rotated.partial = bytearray(data[last + 1 :])
            if len(rotated.partial) > self._max_line:
                self._skip_long_line()
                rotated.partial.clear()
                rotated.discarding = True
        return grew

    def _update_stalled_note(self) -> None:
        growing = [r for r in self._rotated if r.grew_later]
        fd, lost_at = self._fd, self._lost_at
        if fd is not None and lost_at is not None and os.fstat(fd).st_size > lost_at:
            # Renamed away, nothing at the path: the file still read is the rotated one.
            note = (
                f"{self.path} is gone while the file it named, now {_fd_path(fd)}, still grows: the "
                "trainer writes to its old file (have it reopen its log after rotation, or use "
                "copytruncate)"
            )
        elif growing and not self._grew_since_rotation:
            note = (
                f"{self.path} stopped growing while the rotated file {_fd_path(growing[0].fd)} still "
                "grows: the trainer writes to its old file (have it reopen its log after rotation, "
                "or use copytruncate)"
            )
        else:
            self.stalled_note = None
            return
        if note != self.stalled_note:
            logger.warning("%s", note)
        self.stalled_note = note

    def _require_fd(self) -> int:
        if self._fd is None:
            raise RuntimeError(f"{self.path}: no file is open")  # a bug in this class
        return self._fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _EmitterShutdownNoise(logging.Filter):
    """Drops what watchdog's inotify emitter logs at ERROR when its folder vanished or the
    observer stopped under it: at shutdown, or after a watched folder was deleted, it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_EmitterShutdownNoise())


def _fd_path(fd: int) -> str:
    """The current name of an open file, for messages (it moved since it was opened)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "(renamed)"


_WAKING_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,  # a folder on the way to the target: move the watch down
    DirMovedEvent,
    DirDeletedEvent,
]
_LINK_LIMIT = 40  # symlinks followed resolving one path, as the kernel does (ELOOP past it)


def _links_on_the_way(path: str) -> list[str]:
    """The symlinks met resolving the absolute ``path``, in order, each named by its real folder
    (so a watch on that folder sees it replaced): the log's own name, a folder on the way
    (``latest -> run-1``), and the links those point through."""
    links: list[str] = []
    pending = [part for part in path.split(os.sep) if part]
    current = os.sep
    while pending and len(links) < _LINK_LIMIT:
        part = pending.pop(0)
        if part in (".", ".."):
            current = current if part == "." else os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        try:
            pointed = os.readlink(candidate)
        except OSError:  # not a link, or not there (yet)
            current = candidate
            continue
        links.append(candidate)
        current = os.sep if os.path.isabs(pointed) else current
        pending[:0] = [p for p in pointed.split(os.sep) if p]
    return links


def _identity(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0)
    return (st.st_dev, st.st_ino)


@dataclass(frozen=True)
class _Plan:
    """What a :class:`ChangeWatcher` watches, every path real (no symlink in it): inotify on a
    symlinked folder would watch the link, not the folder it points to."""

    target: str  # the target, every link on the way resolved
    recursive: bool  # the target is a folder, watched with all below it
    main: str  # the folder whose events name the target: it, its folder, or the nearest ancestor
    watches: frozenset[tuple[str, bool, tuple[int, int]]]  # (folder, recursive, its identity)
    # Paths whose creation, removal or move changes the plan: the target, the folder watched for
    # it (seen from its parent: renamed and made again, it is another folder), the links met.
    structure: frozenset[str]

    @property
    def waiting(self) -> bool:
        """True while an ancestor is watched for the target's folder to appear."""
        return self.main not in (self.target, os.path.dirname(self.target))

    def on_the_way(self, path: str) -> bool:
        return any(key == path or key.startswith(path + os.sep) for key in self.structure)


class _WakeOnPath(FileSystemEventHandler):
    """Turns watchdog events into wake-ups for one target path, and re-plans the watch when a
    folder or link on the way to the target (or the target itself) appears, goes or moves."""

    def __init__(self, watcher: ChangeWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        plan = self._watcher.plan
        if plan is None:
            return
        paths = {os.fsdecode(event.src_path), os.fsdecode(event.dest_path)} - {""}
        if not isinstance(event, FileModifiedEvent) and any(plan.on_the_way(p) for p in paths):
            self._watcher.replan()
            return
        if plan.recursive:
            inside = any(p.startswith(plan.target + os.sep) for p in paths)
        else:
            inside = plan.target in paths or (
                # A file a follower still drains under another name (the trainer writes to it).
                isinstance(event, FileModifiedEvent) and bool(DRAINED) and any(map(DRAINED.holds, paths))
            )
        if inside:
            _call_wake(self._watcher.wake)


def _call_wake(wake: Callable[[], None]) -> None:
    # An exception would kill the watcher thread and silently stop all wake-ups.
    try:
        wake()
    except Exception:
        logger.exception("log change callback failed")


def _signature(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


_REPLAN_ROUNDS = 8  # deeper than any path that appears at once in practice


class ChangeWatcher:
    """Calls ``wake()`` (from a background thread) whenever the file at ``path`` may have changed.

    Watches the parent directory, so the file may appear, be rotated or be deleted. When the
    path is a directory (or ``children=True`` and it appears as one), any file created, changed,
    moved or deleted in it or in a folder below it wakes (polling sees only the directory's own
    entries change; the daemon's heartbeat reads the rest). A path whose folder does not exist
    yet is waited for with inotify on its nearest existing ancestor, moving down as folders
    appear (and up again if they go), so a late ``runs/`` is seen at once. The folder watched is
    also watched from its parent, so one renamed (or deleted) and made again is watched at once.
    Symlinks on the way (the log a link, ``latest -> run-1`` above it) are resolved and the
    folder of each is watched: pointed elsewhere, the watch moves to the new target. A file a
    :class:`LogFollower` still drains under another name (see :data:`DRAINED`) wakes too.
    Uses inotify (through watchdog); with ``poll=True``, or when inotify cannot start
    (instance or watch limits, no inotify on this system), polls the path's (inode, size, mtime) every
    ``poll_interval`` seconds instead (a directory's mtime moves when an entry changes).
    """

    def __init__(
        self,
        path: Path,
        wake: Callable[[], None],
        *,
        poll: bool = False,
        poll_interval: float = 0.5,
        children: bool = False,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, not {poll_interval}")
        self.path = Path(path)
        self._target = os.path.abspath(self.path)
        self._wake = wake
        self._children = children
        self._mode = "polling" if poll else "inotify"
        self._poll_interval = poll_interval
        self._observer: BaseObserver | None = None
        self._poller: threading.Thread | None = None
        self._stopping = threading.Event()
        self._handler = _WakeOnPath(self)
        self._watches: dict[tuple[str, bool, tuple[int, int]], ObservedWatch] = {}
        self._plan: _Plan | None = None  # what is watched now
        self._plan_lock = threading.Lock()
        self._replan_wanted = False
        self._on_drained = lambda: self.replan(wake=False)

    @property
    def mode(self) -> str:
        """``"inotify"`` or ``"polling"`` (what :meth:`start` fell back to, once started); with
        inotify waiting on an ancestor, ``"inotify (waiting for <path> to appear)"``."""
        plan = self._plan
        if self._mode == "inotify" and plan is not None and plan.waiting:
            return f"inotify (waiting for {self.path} to appear)"
        return self._mode

    @property
    def target(self) -> str:
        return self._target

    @property
    def plan(self) -> _Plan | None:
        return self._plan

    @property
    def recursive(self) -> bool:
        """True while the target is a folder watched with all below it."""
        plan = self._plan
        return plan is not None and plan.recursive

    def wake(self) -> None:
        self._wake()

    def start(self) -> None:
        if self._observer is not None or self._poller is not None:
            raise RuntimeError(f"the watcher for {self.path} is already started")
        self._stopping.clear()
        if self._mode == "inotify":
            try:
                self._observer = self._start_inotify()
                if not self._children:
                    DRAINED.subscribe(self._on_drained)
                    self.replan(wake=False)  # a file drained already
                return
            except (OSError, UnsupportedLibcError) as exc:
                logger.warning("%s: inotify unavailable (%s); polling instead", self.path, exc)
                self._mode = "polling"
        self._poller = threading.Thread(
            target=self._poll_loop,
            args=(self._poll_signature(),),
            name=f"ckptd-poll-{self.path.name}",
            daemon=True,
        )
        self._poller.start()

    def stop(self) -> None:
        """Stop and join the background thread; safe to call more than once."""
        self._stopping.set()
        DRAINED.unsubscribe(self._on_drained)
        observer, self._observer = self._observer, None
        if observer is not None:
            # An emitter whose folder vanished (or that was stopped) may raise on the way out:
            # at shutdown that is noise, said at debug level only.
            try:
                observer.stop()
                observer.join()
            except (OSError, KeyError, RuntimeError) as exc:
                logger.debug("%s: watcher stopped with %r", self.path, exc)
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.join()

    def replan(self, *, wake: bool = True) -> None:
        """Watch where the target can be seen from now (it, its folder, or the nearest ancestor
        that exists; through the links on the way), then wake: what appeared before the new watch
        was placed is read too.

        Called from watchdog's thread (which holds the observer's lock) and from a follower's
        (through :data:`DRAINED`): a caller that finds another planning leaves the work to it
        rather than wait for it, so neither waits on the other's lock.
        """
        self._replan_wanted = True
        while self._replan_wanted and self._plan_lock.acquire(blocking=False):
            try:
                while self._replan_wanted:
                    self._replan_wanted = False
                    self._replan_now()
            finally:
                self._plan_lock.release()
        if wake:
            _call_wake(self._wake)

    def _replan_now(self) -> None:
        observer = self._observer
        # Again until the plan holds still: a folder created (mkdir -p) between planning
        # and placing the watch sends no event to the new watch, so look once more after.
        for _ in range(_REPLAN_ROUNDS):
            plan = self._make_plan()
            if observer is None or self._stopping.is_set() or plan == self._plan:
                break
            try:
                self._schedule(observer, plan)
            except OSError as exc:  # a folder went again between the check and the watch
                logger.debug("%s: cannot watch %s yet (%s)", self.path, plan.main, exc)

    def _make_plan(self) -> _Plan:
        """The target folder itself (recursive), else its folder or the nearest existing one on
        the way; the parent of that; the folder of every link met; the folders of drained files."""
        links = _links_on_the_way(self._target)
        target = os.path.realpath(self._target)
        recursive = os.path.isdir(target)
        main = target if recursive else os.path.dirname(target)
        while not os.path.isdir(main) and os.path.dirname(main) != main:
            main = os.path.dirname(main)
        folders = {main: recursive}
        folders.setdefault(os.path.dirname(main), False)
        for link in links:
            folders.setdefault(os.path.dirname(link), False)
        if not self._children and DRAINED:
            for drained in DRAINED.paths():
                folders.setdefault(os.path.dirname(drained), False)
        watches = frozenset((folder, deep, _identity(folder)) for folder, deep in folders.items())
        return _Plan(target, recursive, main, watches, frozenset({target, main, *links}))

    def _schedule(self, observer: BaseObserver, plan: _Plan) -> None:
        current = self._watches
        stale = [key for key in current if key not in plan.watches]
        wanted = [key for key in plan.watches if key not in current]
        # A folder at the same path but another one now (renamed and made again): watchdog
        # keeps one watch per path, so the old one goes first.
        for key in stale:
            if any(key[:2] == new[:2] for new in wanted):
                self._unschedule(observer, current.pop(key))
        for key in sorted(wanted):
            if key[2] == (0, 0) and key[0] != plan.main:
                continue  # gone since it was planned (a drained file's folder): nothing to see there
            try:
                current[key] = observer.schedule(
                    self._handler, key[0], recursive=key[1], event_filter=_WAKING_EVENTS
                )
            except OSError as exc:
                if key[0] == plan.main:
                    raise
                # The folder above, a link's or a drained file's: a help, not a need (a folder
                # we may not read, the watch limit). Without it the heartbeat still reads.
                logger.debug("%s: cannot watch %s (%s)", self.path, key[0], exc)
        for key in stale:
            if key in current:
                self._unschedule(observer, current.pop(key))
        was, self._plan = self._plan, plan
        if plan.waiting and (was is None or was.main != plan.main):
            logger.info("%s: waiting for it to appear (watching %s)", self.path, plan.main)

    def _unschedule(self, observer: BaseObserver, watch: ObservedWatch) -> None:
        try:
            observer.unschedule(watch)
        except (KeyError, OSError) as exc:  # its folder was deleted: the watch is gone already
            logger.debug("%s: unwatching %s: %r", self.path, watch.path, exc)

    def _start_inotify(self) -> BaseObserver:
        # Imported here: without inotify in libc the import itself raises
        # UnsupportedLibcError, which is a reason to poll, not to refuse to start.
        from watchdog.observers.inotify import InotifyObserver

        observer = InotifyObserver()  # opens an inotify instance: OSError at the limit
        try:
            # Started first, so each watch is placed (or refused) on its own as it is scheduled.
            observer.start()
            self._schedule(observer, self._make_plan())
        except OSError:
            observer.stop()  # releases the inotify instance it opened
            if observer.is_alive():
                observer.join()
            self._watches.clear()
            self._plan = None
            raise
        return observer

    def _poll_signature(self) -> tuple[object, ...]:
        drained = DRAINED.paths() if not self._children and DRAINED else []
        return (_signature(self._target), *map(_signature, drained))

    def _poll_loop(self, last: tuple[object, ...]) -> None:
        while not self._stopping.wait(self._poll_interval):
            current = self._poll_signature()
            if current != last:
                last = current
                _call_wake(self._wake)
