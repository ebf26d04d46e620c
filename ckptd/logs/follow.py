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
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.utils import UnsupportedLibcError

logger = logging.getLogger("ckptd.logs")

_CHUNK = 1 << 20
_HEAD_BYTES = 64


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


class LogFollower:
    """Returns the complete lines appended to one file since the previous call.

    Not thread-safe: one caller polls :meth:`read_lines` (typically when a
    :class:`ChangeWatcher` wakes it). Lines come back without ``\\n`` (and without a
    trailing ``\\r``); a line is never returned half, and never twice except after a rewind.
    """

    def __init__(self, path: Path, cursor: Cursor | None = None, max_line_bytes: int = 1 << 20) -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be >= 1, not {max_line_bytes}")
        self.path = Path(path)
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
        blocks: list[bytes] = []
        if self._fd is not None and at_path is not None and at_path != self._ident:
            # Another file took the name (rename-rotation, or deleted and recreated): the
            # held one is finished, so drain it, unterminated last line included.
            blocks = self._read_new(final=True, max_bytes=None)
            self._close_fd()
        self.at_end = True
        if self._fd is None and (at_path is None or not self._open()):
            return blocks
        return blocks + self._read_new(final=False, max_bytes=max_bytes)

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
        if self._fd is not None:
            self._resume = self.cursor
            self._close_fd()

    def _identity_at_path(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    def _open(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False  # removed between the stat and the open
        st = os.fstat(fd)
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

    def _read_new(self, *, final: bool, max_bytes: int | None) -> list[bytes]:
        st = os.fstat(self._require_fd())
        blocks: list[bytes] = []
        # Size and mtime unchanged since the file was last read to its end: nothing to read.
        if (st.st_size, st.st_mtime_ns) != self._seen:
            if not self._same_content(st.st_size):
                self.rewinds += 1
                self._reset()
            self.at_end = self._read_to_eof(blocks, max_bytes)
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

    def _read_to_eof(self, blocks: list[bytes], max_bytes: int | None) -> bool:
        """Read on, up to about ``max_bytes``; True when the end of the file was reached."""
        fd = self._require_fd()
        budget = max_bytes
        while budget is None or budget > 0:
            data = os.pread(fd, _CHUNK, self._read_pos)
            if not data:
                return True
            if self._read_pos < _HEAD_BYTES:
                self._head += data[: _HEAD_BYTES - self._read_pos]
            self._feed(data, blocks)
            self._read_pos += len(data)
            if len(data) < _CHUNK:
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

    def _require_fd(self) -> int:
        if self._fd is None:
            raise RuntimeError(f"{self.path}: no file is open")  # a bug in this class
        return self._fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_WAKING_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
]


class _WakeOnPath(FileSystemEventHandler):
    """Calls ``wake`` for events that touch the target path (or, with ``children``, any file below it)."""

    def __init__(self, target: str, wake: Callable[[], None], children: bool) -> None:
        self._target = target
        self._wake = wake
        self._children = children

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        paths = {os.fsdecode(event.src_path), os.fsdecode(event.dest_path)} - {""}
        if self._children:
            inside = any(p.startswith(self._target + os.sep) for p in paths)
        else:
            inside = self._target in paths
        if inside:
            _call_wake(self._wake)


def _call_wake(wake: Callable[[], None]) -> None:
    # An exception would kill the watcher thread and silently stop all wake-ups.
    try:
        wake()
    except Exception:
        logger.exception("log change callback failed")


def _signature(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ChangeWatcher:
    """Calls ``wake()`` (from a background thread) whenever the file at ``path`` may have changed.

    Watches the parent directory, which must exist, so the file may appear, be rotated or
    be deleted. With ``children=True`` the path is a directory, which must exist, and any
    file created, changed, moved or deleted in it or in a folder below it wakes (polling
    sees only the directory's own entries change; the daemon's heartbeat reads the rest).
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

    @property
    def mode(self) -> str:
        """``"inotify"`` or ``"polling"`` (what :meth:`start` fell back to, once started)."""
        return self._mode

    def start(self) -> None:
        if self._observer is not None or self._poller is not None:
            raise RuntimeError(f"the watcher for {self.path} is already started")
        self._stopping.clear()
        if self._mode == "inotify":
            try:
                self._observer = self._start_inotify()
                return
            except (OSError, UnsupportedLibcError) as exc:
                logger.warning("%s: inotify unavailable (%s); polling instead", self.path, exc)
                self._mode = "polling"
        self._poller = threading.Thread(
            target=self._poll_loop,
            args=(_signature(self._target),),
            name=f"ckptd-poll-{self.path.name}",
            daemon=True,
        )
        self._poller.start()

    def stop(self) -> None:
        """Stop and join the background thread; safe to call more than once."""
        self._stopping.set()
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join()
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.join()

    def _start_inotify(self) -> BaseObserver:
        # Imported here: without inotify in libc the import itself raises
        # UnsupportedLibcError, which is a reason to poll, not to refuse to start.
        from watchdog.observers.inotify import InotifyObserver

        observer = InotifyObserver()  # opens an inotify instance: OSError at the limit
        observer.schedule(
            _WakeOnPath(self._target, self._wake, self._children),
            self._target if self._children else os.path.dirname(self._target),
            recursive=self._children,
            event_filter=_WAKING_EVENTS,
        )
        try:
            observer.start()
        except OSError:
            observer.stop()  # releases the inotify instance it opened
            raise
        return observer

    def _poll_loop(self, last: tuple[int, int, int, int] | None) -> None:
        while not self._stopping.wait(self._poll_interval):
            current = _signature(self._target)
            if current != last:
                last = current
                _call_wake(self._wake)
