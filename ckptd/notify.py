"""systemd's notify protocol (``sd_notify``) for ckptd's daemons, with the standard library only.

Under a unit with ``Type=notify`` systemd passes the daemon ``NOTIFY_SOCKET`` (a datagram socket:
a file path, or ``@name`` for an abstract one) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` and
``WATCHDOG_PID``. Through it the daemon says:

- ``READY=1`` once it serves (``systemctl start`` returns then, units ordered after it start);
- ``STATUS=...``, the one line ``systemctl status`` shows;
- ``WATCHDOG=1`` at least every ``WatchdogSec``: :meth:`Notifier.watchdog` sends it at half the
  interval, whenever the loop calls it, and the loop sizes its wake-up with
  :meth:`Notifier.watchdog_due_in`; call it from the loop that does the work, never from a thread
  of its own, or a wedged loop would still look alive;
- ``RELOADING=1`` on a reload (SIGHUP), then ``READY=1`` again when the new configuration is in;
- ``STOPPING=1`` when it starts draining, and ``EXTEND_TIMEOUT_USEC=...`` if the drain needs
  longer than ``TimeoutStopSec`` allows.

Without ``NOTIFY_SOCKET`` (a terminal, Slurm, a container) every method is a no-op. A send that
fails is logged once at warning and never raised: the daemon must not die because its manager
went away. Processes the daemon starts should get :func:`child_environ`, so that they do not
talk to systemd in its name.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("ckptd.notify")

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# A send waits at most this long for room in the manager's queue: a wedged manager must not
# wedge the daemon.
SEND_TIMEOUT_S = 1.0


def socket_address(value: str) -> str | None:
    """``NOTIFY_SOCKET`` as an ``AF_UNIX`` address: ``@name`` is abstract (a leading NUL), an
    absolute path is a file; anything else (``vsock:``, a relative path) is not supported: None."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1``: half of ``WATCHDOG_USEC``, as systemd advises; None
    when there is no watchdog, or when ``WATCHDOG_PID`` names another process (a child that
    inherited its parent's environment)."""
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid and watchdog_pid.strip() != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def child_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` without the notify variables, for the processes a daemon starts."""
    return {key: value for key, value in environ.items() if key not in NOTIFY_VARIABLES}


def one_line(text: str) -> str:
    """``text`` on one line: a newline in a status would start a new assignment (``READY=1``)."""
    return " ".join(text.replace("\0", " ").splitlines())


class Notifier:
    """Messages to systemd's notify socket; every method is a no-op when there is none.

    Each method returns whether a datagram was sent, and never raises.
    """

    def __init__(
        self,
        address: str | None,
        watchdog_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._address = address
        self.watchdog_interval = watchdog_interval if address is not None else None
        self._clock = clock
        self._last_watchdog: float | None = None
        self._warned = False

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic
    ) -> Notifier:
        """The notifier systemd's environment asks for (``os.environ`` by default)."""
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        address = socket_address(value) if value else None
        if value and address is None:
            log.warning("NOTIFY_SOCKET=%r is not a socket ckptd can use; not notifying systemd", value)
        return cls(address, watchdog_interval(env, os.getpid()), clock)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.send(*_status(text))

    def reloading(self, status: str | None = None) -> bool:
        """Say a reload began; send :meth:`ready` when it is done (``MONOTONIC_USEC`` is what
        ``Type=notify-reload`` also wants)."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status(status))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more from now than the running start/stop timeout gives."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1e6))}")

    def watchdog_due_in(self) -> float | None:
        """Seconds until :meth:`watchdog` will send again (0: now); None without a watchdog."""
        if self.watchdog_interval is None:
            return None
        if self._last_watchdog is None:
            return 0.0
        return max(0.0, self._last_watchdog + self.watchdog_interval - self._clock())

    def watchdog(self) -> bool:
        """``WATCHDOG=1`` if the interval is due (a failed send also waits for the next one)."""
        if self.watchdog_due_in() != 0.0:
            return False
        self._last_watchdog = self._clock()
        return self.send("WATCHDOG=1")

    def send(self, *assignments: str) -> bool:
        """One datagram of ``KEY=VALUE`` lines; False (logged) if there is no socket or it fails."""
        if self._address is None or not assignments:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(SEND_TIMEOUT_S)
                # Connected, a full queue on the manager's side blocks (up to the timeout)
                # instead of failing at once.
                sock.connect(self._address)
                sock.send("\n".join(assignments).encode())
        except OSError as exc:
            self._failed(exc)
            return False
        return True

    def _failed(self, exc: OSError) -> None:
        shown = (self._address or "").replace("\0", "@", 1)
        if self._warned:
            log.debug("systemd notification to %s failed: %s", shown, exc)
            return
        self._warned = True
        log.warning(
            "systemd notification to %s failed (%s); going on without it (later failures are "
            "logged at debug level)",
            shown,
            exc,
        )


def _status(text: str | None) -> tuple[str, ...]:
    return () if text is None else (f"STATUS={one_line(text)}",)
