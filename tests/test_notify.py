"""``ckptd.notify``: what reaches a real notify socket, byte for byte, and what never raises.

Every test sends to a real ``AF_UNIX`` datagram socket (tests/notify_socket.py), bound to a file
or to an abstract name, as systemd's is.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptd import notify
from ckptd.notify import Notifier, child_environ, socket_address
from tests.notify_socket import NotifySocket


@pytest.fixture(params=["path", "abstract"])
def sock(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    with NotifySocket(tmp_path, abstract=request.param == "abstract") as bound:
        yield bound


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def datagrams(sock: NotifySocket) -> list[bytes]:
    return [message.data for message in sock.drain(0.1)]


def test_address_forms() -> None:
    assert socket_address("@ckptd/notify") == "\0ckptd/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@") is None
    assert socket_address("vsock:2:1234") is None
    assert socket_address("run/notify") is None


def test_each_message_is_exact_and_comes_from_this_process(sock: NotifySocket) -> None:
    notifier = Notifier.from_environ(sock.environ())
    assert notifier.enabled
    assert notifier.ready("following 3 runs")
    assert notifier.status("persisting step 750")
    assert notifier.stopping("draining 2 runs")
    assert notifier.extend_timeout(90)
    received = sock.drain(0.1)
    assert [message.data for message in received] == [
        b"READY=1\nSTATUS=following 3 runs",
        b"STATUS=persisting step 750",
        b"STOPPING=1\nSTATUS=draining 2 runs",
        b"EXTEND_TIMEOUT_USEC=90000000",
    ]
    assert {message.pid for message in received} == {os.getpid()}


def test_ready_and_stopping_without_status(sock: NotifySocket) -> None:
    notifier = Notifier.from_environ(sock.environ())
    notifier.ready()
    notifier.stopping()
    assert datagrams(sock) == [b"READY=1", b"STOPPING=1"]


def test_reloading_carries_the_monotonic_clock(sock: NotifySocket) -> None:
    before = time.monotonic_ns() // 1000
    Notifier.from_environ(sock.environ()).reloading("reloading /etc/ckptd/ckptd.toml")
    after = time.monotonic_ns() // 1000
    (message,) = sock.drain(0.1)
    assert message.assignments[0] == "RELOADING=1"
    assert before <= int(message.fields["MONOTONIC_USEC"]) <= after
    assert message.assignments[2] == "STATUS=reloading /etc/ckptd/ckptd.toml"


def test_a_status_cannot_inject_an_assignment(sock: NotifySocket) -> None:
    Notifier.from_environ(sock.environ()).status("bad\nREADY=1\r\nSTOPPING=1\0x")
    (message,) = sock.drain(0.1)
    assert message.assignments == ["STATUS=bad READY=1 STOPPING=1 x"]


def test_watchdog_is_paced_at_half_of_watchdog_usec(tmp_path: Path) -> None:
    clock = FakeClock()
    with NotifySocket(tmp_path) as sock:
        notifier = Notifier.from_environ(sock.environ(watchdog_usec=200_000), clock=clock)
        assert notifier.watchdog_interval == pytest.approx(0.1)
        assert notifier.watchdog_due_in() == 0.0
        sent = []
        for now in (0.0, 0.05, 0.0999, 0.1, 0.15, 0.2, 0.35, 0.4):
            clock.now = 1000.0 + now
            sent.append(notifier.watchdog())
        assert sent == [True, False, False, True, False, True, True, False]
        assert notifier.watchdog_due_in() == pytest.approx(0.05)  # last sent at 0.35
        assert datagrams(sock) == [b"WATCHDOG=1"] * 4


def test_watchdog_in_real_time(tmp_path: Path) -> None:
    with NotifySocket(tmp_path) as sock:
        notifier = Notifier.from_environ(sock.environ(watchdog_usec=400_000))
        assert notifier.watchdog()
        assert not notifier.watchdog()  # 0.2 s have not passed
        due = notifier.watchdog_due_in()
        assert due is not None and 0 < due <= 0.2
        time.sleep(due)
        assert notifier.watchdog()
        assert [m.data for m in sock.drain(0.1)] == [b"WATCHDOG=1", b"WATCHDOG=1"]


def test_watchdog_pid_names_the_process_that_pings(tmp_path: Path) -> None:
    with NotifySocket(tmp_path) as sock:
        env = sock.environ(watchdog_usec=200_000)
        other = Notifier.from_environ({**env, "WATCHDOG_PID": str(os.getpid() + 1)})
        assert other.watchdog_interval is None
        assert other.watchdog_due_in() is None
        assert not other.watchdog()
        assert other.ready()  # the watchdog is someone else's; READY=1 is still ours to send
        garbled = Notifier.from_environ({**env, "WATCHDOG_PID": "systemd"})
        assert garbled.watchdog_interval is None
        ours = Notifier.from_environ({**env, "WATCHDOG_PID": str(os.getpid())})
        assert ours.watchdog_interval == pytest.approx(0.1)
        assert ours.watchdog()
        assert datagrams(sock) == [b"READY=1", b"WATCHDOG=1"]


@pytest.mark.parametrize("usec", ["0", "-5", "soon", ""])
def test_no_watchdog_without_a_positive_watchdog_usec(tmp_path: Path, usec: str) -> None:
    with NotifySocket(tmp_path) as sock:
        notifier = Notifier.from_environ({**sock.environ(), "WATCHDOG_USEC": usec})
        assert notifier.watchdog_interval is None
        assert not notifier.watchdog()
        assert datagrams(sock) == []


def test_no_socket_means_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket(*args: object) -> None:
        raise AssertionError("a socket was opened without NOTIFY_SOCKET")

    monkeypatch.setattr(socket, "socket", no_socket)
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "200000", "PATH": "/usr/bin"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None  # a loop must not wake up for a watchdog it cannot ping
    assert notifier.watchdog_due_in() is None
    results = [notifier.ready("x"), notifier.status("x"), notifier.watchdog(), notifier.stopping()]
    assert results == [False] * 4


def test_os_environ_is_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with NotifySocket(tmp_path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", sock.value)
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        assert Notifier.from_environ().ready()
        assert datagrams(sock) == [b"READY=1"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not Notifier.from_environ().enabled


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/notify.sock"])
def test_an_unusable_socket_is_a_warning_not_an_error(value: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "ckptd.notify"):
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert not notifier.enabled and not notifier.ready()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert value in caplog.records[0].getMessage()


@pytest.mark.parametrize("how", ["unlinked", "closed", "abstract-closed", "path-too-long"])
def test_a_dead_socket_never_raises_and_warns_once(
    how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sock = NotifySocket(tmp_path, abstract=how == "abstract-closed").__enter__()
    env = sock.environ(watchdog_usec=2)
    if how == "closed":  # the socket file stays: ECONNREFUSED
        sock._sock.close()
    else:  # the file is gone too (or the name is free): ENOENT / ECONNREFUSED
        sock.close()
    if how == "path-too-long":
        env["NOTIFY_SOCKET"] = "/" + "x" * 200
    notifier = Notifier.from_environ(env)
    with caplog.at_level(logging.DEBUG, "ckptd.notify"):
        assert not notifier.ready("up")
        assert not notifier.watchdog()
        assert not notifier.status("still here")
        assert not notifier.stopping()
    levels = [record.levelno for record in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG, logging.DEBUG]
    sock.close()


def test_sending_resumes_when_the_socket_comes_back(tmp_path: Path) -> None:
    first = NotifySocket(tmp_path).__enter__()
    notifier = Notifier.from_environ(first.environ())
    first.close()
    assert not notifier.status("nobody listens")
    with NotifySocket(tmp_path) as second:  # same path: systemd re-executed itself
        assert second.value == first.value
        assert notifier.status("back")
        assert datagrams(second) == [b"STATUS=back"]


def test_a_full_queue_blocks_at_most_the_send_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notify, "SEND_TIMEOUT_S", 0.2)
    with NotifySocket(tmp_path) as sock:
        notifier = Notifier.from_environ(sock.environ())
        sent: list[bool] = []

        def fill() -> None:  # nobody reads: the receive queue fills up, then a send times out
            while notifier.status("x" * 60_000):
                sent.append(True)
            sent.append(False)

        filler = threading.Thread(target=fill, daemon=True)
        filler.start()
        filler.join(timeout=10)
        assert not filler.is_alive(), "a send to a full queue blocked past its timeout"
        assert sent[-1] is False and len(sent) > 1
        assert len(sock.drain(0.1)) == len(sent) - 1


def test_child_environ_drops_only_the_notify_variables() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "7", "PATH": "/bin", "HOME": "/r"}
    assert child_environ(env) == {"PATH": "/bin", "HOME": "/r"}
    assert env["NOTIFY_SOCKET"] == "@x"  # a copy


# -- the helper other tests use ---------------------------------------------------------------


def test_notify_socket_wait_for_checks_order(tmp_path: Path) -> None:
    with NotifySocket(tmp_path) as sock:
        notifier = Notifier.from_environ(sock.environ(watchdog_usec=10_000_000))
        notifier.stopping()
        notifier.ready()
        notifier.watchdog()
        assert sock.wait_for("READY=1", timeout=2).data == b"READY=1"
        assert sock.wait_for("WATCHDOG=1", timeout=2).pid == os.getpid()
        with pytest.raises(AssertionError, match="STOPPING=1"):
            sock.wait_for("STOPPING=1", timeout=0.2)  # it came first, not after WATCHDOG=1


def test_notify_socket_shortens_a_path_too_long_for_af_unix(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    with NotifySocket(deep) as sock:
        assert len(sock.value) <= 107 and os.path.exists(sock.value)
        assert Notifier.from_environ(sock.environ()).ready()
        assert datagrams(sock) == [b"READY=1"]
        path = sock.value
    assert not os.path.exists(path)


def test_notify_socket_receives_from_a_plain_sender(tmp_path: Path) -> None:
    """The helper itself, without ckptd's code: what systemd would read."""
    with NotifySocket(tmp_path, abstract=True) as sock, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1\nSTATUS=a=b", sock.address)
        message = sock.wait_for("READY=1", timeout=2)
        assert message.fields == {"READY": "1", "STATUS": "a=b"}
        assert message.pid == os.getpid()
