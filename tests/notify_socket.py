"""A stand-in for systemd's notify socket, for tests that check what a daemon tells systemd.

Use it with a daemon started as a subprocess::

    with NotifySocket(tmp_path) as notify:
        proc = subprocess.Popen([...ckptd serve...], env=notify.environ(watchdog_usec=400_000))
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")       # each wait_for looks only past the last match: order

The socket is a real ``AF_UNIX`` ``SOCK_DGRAM`` socket with ``SO_PASSCRED``, as systemd's is, so
every message carries its sender's pid (``NotifyAccess=main`` means only the main pid counts).
``environ()`` sets no ``WATCHDOG_PID``: a child's pid is not known before it starts, and without
it the watchdog is the receiving process's, as with ``sd_watchdog_enabled``.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_MAX_PATH = 107  # sun_path holds 108 bytes with the NUL


@dataclass(frozen=True)
class Message:
    data: bytes
    pid: int | None  # the sender's, from SCM_CREDENTIALS

    @property
    def assignments(self) -> list[str]:
        return self.data.decode().split("\n")

    @property
    def fields(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.assignments if "=" in line)


class NotifySocket:
    """Binds a datagram socket (a file in ``directory``, or an abstract name) and collects what
    arrives. ``wait_for`` consumes messages in order, so successive calls check their order."""

    def __init__(self, directory: Path | None = None, *, abstract: bool = False) -> None:
        self.abstract = abstract
        self.messages: list[Message] = []
        self._cursor = 0
        self._own_dir: str | None = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            self.address = f"\0ckptd-test-{uuid.uuid4().hex}"
            self.value = "@" + self.address[1:]
        else:
            self.address = self._path(directory)
            self.value = self.address

    def _path(self, directory: Path | None) -> str:
        path = os.path.join(directory, "notify.sock") if directory is not None else ""
        if not path or len(os.fsencode(path)) > _MAX_PATH:  # pytest's tmp_path can be too long
            self._own_dir = tempfile.mkdtemp(prefix="ckptd-notify-")
            path = os.path.join(self._own_dir, "notify.sock")
        return path

    def __enter__(self) -> NotifySocket:
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind(self.address)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close and remove the socket: a sender now finds nothing there (as when systemd is gone)."""
        self._sock.close()
        if not self.abstract and os.path.exists(self.address):
            os.unlink(self.address)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def environ(self, watchdog_usec: int | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (``os.environ``) with ``NOTIFY_SOCKET`` set to this socket (and ``WATCHDOG_USEC``)."""
        env = dict(os.environ if base is None else base)
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(key, None)
        env["NOTIFY_SOCKET"] = self.value
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def receive(self, timeout: float) -> Message | None:
        """The next datagram, or None if none came within ``timeout`` seconds."""
        self._sock.settimeout(max(timeout, 1e-6))
        try:
            data, ancdata, _flags, _addr = self._sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        except TimeoutError:
            return None
        message = Message(data, _sender_pid(ancdata))
        self.messages.append(message)
        return message

    def drain(self, timeout: float = 0.2) -> list[Message]:
        """Everything that arrives until ``timeout`` seconds pass without a datagram."""
        got = []
        while (message := self.receive(timeout)) is not None:
            got.append(message)
        return got

    def wait_for(self, assignment: str, timeout: float = 20.0) -> Message:
        """The first message past the previous match holding ``assignment`` (e.g. ``READY=1``)."""
        deadline = time.monotonic() + timeout
        while True:
            for index in range(self._cursor, len(self.messages)):
                if assignment in self.messages[index].assignments:
                    self._cursor = index + 1
                    return self.messages[index]
            self._cursor = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0 or self.receive(left) is None:
                raise AssertionError(
                    f"no {assignment!r} within {timeout} s after the previous match; "
                    f"received: {[m.data for m in self.messages]}"
                )


def _sender_pid(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= _UCRED.size:
            pid: int = _UCRED.unpack_from(data)[0]
            return pid
    return None
