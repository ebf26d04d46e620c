"""The trainer-side client: cheap polling, the post-eval rendezvous, and the snapshot.

Everything here runs inside the training loop, so the rule is: when nothing is
asked, cost one ``os.stat``; when the daemon is gone, cost nothing more and
never raise; when a capture is due, copy tensors to shared memory and return
without touching the store or waiting for a disk.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from ckptd.client.snapshot import Slot, encode_structure, flatten_state, layout_for
from ckptd.errors import ProtocolError, SnapshotError
from ckptd.protocol import (
    STALE_AFTER_S,
    Ack,
    Control,
    RunPaths,
    daemon_alive,
    read_control,
    write_ack,
)
from ckptd.records import Verdict
from ckptd.staging import DEFAULT_SLOTS, STRUCTURE_FILE, TENSORS_FILE, busy_slots, slot_name

log = logging.getLogger("ckptd.client")

StateFn = Callable[[], Any]


class CheckpointClient:
    """Lets a running daemon capture the trainer's state at the steps it asks for.

    With no daemon, every call is a cheap no-op: training must never depend on it.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        rendezvous_timeout: float = 2.0,
        slots: int = DEFAULT_SLOTS,
        slot_timeout: float = 30.0,
        stale_after: float = STALE_AFTER_S,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, not {slots}")
        self.paths = RunPaths(Path(run_dir))
        self.rendezvous_timeout = rendezvous_timeout
        self.slot_timeout = slot_timeout
        self.stale_after = stale_after
        self._slot_count = slots
        self._slots: dict[str, Slot] = {}
        self._control: Control | None = None
        self._control_signature: tuple[int, int, int] | None = None
        self._started = time.time()
        # Verdicts for eval steps up to here are done (captured, or written before we started).
        self._handled_eval_step = -1
        self._last_periodic_step = -1
        self._warned: set[str] = set()
        self._preparing: threading.Thread | None = None

    def __enter__(self) -> CheckpointClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the two calls a training loop makes -------------------------------------------

    def wait_verdict(self, step: int, timeout: float | None = None) -> Verdict | None:
        """After logging an eval at ``step``, wait (bounded) until the daemon has judged it.

        Returns the verdict for ``step`` (or a later one), or None when no daemon is
        alive or none came in time. A ``snapshot`` verdict is then captured by the
        next ``maybe_snapshot``. Flush the log before calling: the daemon can only
        judge lines that reached the file.
        """
        if not daemon_alive(self.paths, self.stale_after):
            return None
        deadline = time.monotonic() + (self.rendezvous_timeout if timeout is None else timeout)
        # The daemon answers in about a millisecond: look often at first (a stat is ~1 us),
        # then back off so a slow or absent answer costs no CPU.
        pause = 0.0001
        while True:
            self._refresh_control()
            verdict = self._control.verdict if self._control else None
            if verdict is not None and verdict.eval_step >= step:
                return verdict
            if time.monotonic() >= deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 1.5, 0.01)

    def maybe_snapshot(self, step: int, state_fn: StateFn) -> bool:
        """At a step boundary: capture ``state_fn()`` if the daemon asked for this step.

        One ``os.stat`` when nothing is due. When a capture is due, tensors are copied
        into a shared-memory slot and acknowledged; the daemon persists them. Returns
        whether a capture was staged.
        """
        self._refresh_control()
        control = self._control
        if control is None:
            return False
        verdict = self._due_verdict(control, step)
        periodic = self._periodic_due(control, step)
        if verdict is None and not periodic:
            return False
        if not daemon_alive(self.paths, self.stale_after):
            self._warn_once("dead", "ckptd daemon heartbeat is stale; snapshots paused")
            return False
        staged = self._capture(control, step, verdict, periodic, state_fn)
        if verdict is not None:
            self._handled_eval_step = verdict.eval_step
        if periodic:
            self._last_periodic_step = step
        return staged

    def prepare(self, state_fn: StateFn) -> bool:
        """Reserve and fault in a shared-memory slot for ``state_fn()`` in the background.

        The first capture otherwise pays for faulting in a fresh slot, page by page (about
        3.5 s per GiB on the development VM, 12 us a page). Call once after the first
        optimizer step (the optimizer state exists then) and before the first eval; it costs
        the trainer the sizing of the state and returns. False, and nothing done, when no
        daemon is alive yet to say where the slots go.
        """
        self._refresh_control()
        if self._control is None or not daemon_alive(self.paths, self.stale_after):
            return False
        self._finish_preparing()
        nbytes = layout_for(flatten_state(state_fn())[0]).total
        slot = self._slot(Path(self._control.staging), slot_name(0))
        self._preparing = threading.Thread(
            target=self._prefault, args=(slot, nbytes), name="ckptd-prefault", daemon=True
        )
        self._preparing.start()
        return True

    def close(self) -> None:
        """Release this process's mappings; free slots are removed from shared memory."""
        self._finish_preparing()
        busy = busy_slots(self.paths)
        for slot in self._slots.values():
            if slot.name in busy:
                slot.close()  # the daemon still needs its bytes
            else:
                slot.unlink()
        self._slots.clear()

    # -- control file --------------------------------------------------------------------

    def _refresh_control(self) -> None:
        try:
            st = os.stat(self.paths.control)
        except FileNotFoundError:
            self._control, self._control_signature = None, None
            return
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature == self._control_signature:
            return
        self._control_signature = signature
        try:
            control = read_control(self.paths.control)
        except FileNotFoundError:
            self._control = None
            return
        except ProtocolError as exc:
            self._warn_once("protocol", f"ignoring control file: {exc}")
            self._control = None
            return
        if control.verdict is not None and control.written < self._started:
            # A verdict from before this process existed speaks of another trainer's step.
            self._handled_eval_step = max(self._handled_eval_step, control.verdict.eval_step)
        self._control = control

    def _due_verdict(self, control: Control, step: int) -> Verdict | None:
        verdict = control.verdict
        if verdict is None or verdict.action != "snapshot":
            return None
        if verdict.eval_step <= self._handled_eval_step or step < verdict.eval_step:
            return None
        return verdict

    def _periodic_due(self, control: Control, step: int) -> bool:
        every = control.every_steps
        return bool(every) and step > 0 and step % every == 0 and step != self._last_periodic_step

    # -- capture ---------------------------------------------------------------------------

    def _prefault(self, slot: Slot, nbytes: int) -> None:
        try:
            slot.ensure_capacity(nbytes)  # the syscalls and page faults run outside the GIL
        except SnapshotError as exc:
            log.warning("ckptd: could not prepare a staging slot: %s", exc)

    def _finish_preparing(self) -> None:
        # A Slot is used by one thread at a time: a capture waits for the preparation.
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None

    def _capture(
        self, control: Control, step: int, verdict: Verdict | None, periodic: bool, state_fn: StateFn
    ) -> bool:
        self._finish_preparing()
        tensors, skeleton = flatten_state(state_fn())
        layout = layout_for(tensors)
        structure = encode_structure(skeleton, step)
        try:
            slot = self._acquire_slot(Path(control.staging), layout.total)
        except SnapshotError as exc:
            log.error("ckptd: snapshot of step %d not taken: %s", step, exc)
            return False
        slot.write(layout, tensors, structure)
        tags = (*(verdict.tags if verdict else ()), *(("periodic",) if periodic else ()))
        write_ack(
            self.paths,
            Ack(
                name=Ack.name_for(control.seq if verdict else None, step),
                captured_step=step,
                slot=slot.name,
                files={TENSORS_FILE: layout.total, STRUCTURE_FILE: len(structure)},
                seq=control.seq if verdict else None,
                requested_step=verdict.eval_step if verdict else step,
                tags=tags,
                reason=verdict.reason if verdict else f"every {control.every_steps} steps",
            ),
        )
        return True

    def _acquire_slot(self, staging: Path, nbytes: int) -> Slot:
        """A slot no pending ack holds, grown to ``nbytes``; waits (bounded) for the daemon to free one."""
        deadline = time.monotonic() + self.slot_timeout
        while True:
            busy = busy_slots(self.paths)
            free = [slot_name(i) for i in range(self._slot_count) if slot_name(i) not in busy]
            if free:
                # Prefer a slot we already hold mapped: no new page faults.
                name = next((n for n in free if n in self._slots), free[0])
                slot = self._slot(staging, name)
                slot.ensure_capacity(nbytes)
                return slot
            if time.monotonic() >= deadline:
                raise SnapshotError(
                    f"all {self._slot_count} staging slots still wait for the daemon "
                    f"after {self.slot_timeout:.0f} s"
                )
            time.sleep(0.01)

    def _slot(self, staging: Path, name: str) -> Slot:
        slot = self._slots.get(name)
        if slot is None or slot.directory.parent != staging:
            slot = self._slots[name] = Slot(staging / name)
        return slot

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("ckptd: %s", message)
