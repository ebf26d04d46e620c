"""The uploader: a thread that mirrors committed checkpoints to the remote tier and rotates it.

It never touches judging, staging or local persists: the persister only hands it each new
checkpoint (``offer``, on the persister's thread, before local retention runs), and local
retention keeps whatever it ``holds``: a checkpoint is held from its commit until the uploader
has decided that the remote policy does not want it, or has uploaded it. Pending uploads are
recorded in ``.ckptd/uploads.json`` (durably), so a restarted daemon resumes them. A failed
upload is retried with backoff (1 s doubling to 60 s); remote retention runs after each upload,
under the remote policy, never deleting another run's checkpoint or one at a best step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ckptd.errors import ProtocolError, StoreError
from ckptd.policy import PreservationPolicy, plan_deletions
from ckptd.protocol import RunPaths, atomic_write_json, read_pending_uploads
from ckptd.records import CheckpointRecord
from ckptd.remote import RemoteError, RemoteStore
from ckptd.store import Store

log = logging.getLogger("ckptd.daemon")

_DROPPED_SHOWN = 10
_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)


class _Stopping(Exception):
    """Raised between two files of an upload when the daemon stops: the rest resumes later."""


class Uploader:
    """Uploads what ``offer`` hands it, one checkpoint at a time, on its own thread."""

    def __init__(
        self,
        remote: RemoteStore,
        store: Store,
        paths: RunPaths,
        policy: PreservationPolicy,
        *,
        lineage: frozenset[str],
        best_steps: Callable[[], frozenset[int]],
        released: Callable[[], None] = lambda: None,
    ) -> None:
        self.remote = remote
        self.store = store
        self.paths = paths
        self.policy = policy
        self.lineage = lineage
        self._best_steps = best_steps
        self._released = released  # a held checkpoint is free for local retention again
        self._lock = threading.Condition()
        self._pending: list[str] = _load_pending(paths)  # held locally, oldest first
        self._stopping = threading.Event()
        self._uploading: str | None = None
        self._uploaded = 0
        self._remote_deleted = 0
        self._last_error: str | None = None
        self._last_upload: dict[str, Any] | None = None
        self._remote_records: list[CheckpointRecord] | None = None  # None: list again
        self._dropped: list[dict[str, str]] = []  # the last checkpoints never to be uploaded, and why
        self._reconciled = False  # the first listing of the remote has been compared with the store
        name = f"{threading.current_thread().name} uploader"
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    def start(self) -> None:
        if self._pending:
            log.info("resuming %d pending upload(s) to %s", len(self._pending), self.remote.url)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the file being sent; what is still pending is resumed at the next start."""
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()
        self._thread.join(timeout)

    def offer(self, record: CheckpointRecord) -> None:
        """A checkpoint just committed: held locally from now on until the uploader decides.
        Never raises (it runs on the persister's thread, after the commit)."""
        with self._lock:
            if record.name not in self._pending:
                self._pending.append(record.name)
                self._save_quietly()
            self._lock.notify_all()

    def held(self) -> frozenset[str] | None:
        """Local checkpoints that local retention must keep: not uploaded yet. None: all of
        them, until the first remote listing has told what the remote lacks."""
        with self._lock:
            return frozenset(self._pending) if self._reconciled else None

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {
                "url": self.remote.url,
                "pending": list(self._pending),
                "uploading": self._uploading,
                "uploaded": self._uploaded,
                "deleted": self._remote_deleted,
                "last_upload": self._last_upload,
                "last_error": self._last_error,
                "not_uploaded": list(self._dropped),
            }

    # -- the thread ----------------------------------------------------------------------------

    def _work(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            name = None
            try:
                if not self._reconciled:
                    self._reconcile()
                    continue
                name = self._next()
                if name is None:
                    continue
                self._handle(name)
            except _Stopping:
                log.info("upload of %s interrupted by the stop; it resumes at the next start", name)
                return
            except (RemoteError, StoreError, OSError, ValueError) as exc:
                pause = _BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)]
                failures += 1
                doing = f"uploading {name} to" if self._reconciled else "listing"
                self._failed(f"{doing} {self.remote.url} failed: {exc}; retried in {pause:.0f} s")
                if name is not None and self._reconciled:
                    self._after_failure(name)
                self._stopping.wait(pause)
            except Exception as exc:  # a dead thread would silently stop every upload
                log.exception("unexpected error uploading %s", name)
                self._failed(f"unexpected {type(exc).__name__} uploading {name}: {exc}")
                self._stopping.wait(_BACKOFF_S[-1])
            else:
                failures = 0

    def _reconcile(self) -> None:
        """At start, before anything may leave the local store: every local checkpoint of this
        run that the remote lacks is pending, whatever uploads.json said (it may be lost or
        damaged). Until this listing succeeds, local retention keeps everything."""
        on_remote = {r.name for r in self._remote()}
        local = [r.name for r in self.store.list() if r.run_id in self.lineage]
        with self._lock:
            missing = [n for n in local if n not in on_remote and n not in self._pending]
            self._pending.extend(missing)
            self._save_quietly()
            self._reconciled = True
        if missing:
            log.info("%d local checkpoint(s) not on %s: pending", len(missing), self.remote.url)
        self._released()

    def _after_failure(self, name: str) -> None:
        """One checkpoint that fails must not stop the others: it goes to the back of the
        queue; one whose local copy no longer verifies will never upload, and is dropped."""
        with self._lock:
            if name in self._pending:
                self._pending.remove(name)
                self._pending.append(name)
        try:
            problems = self.store.verify(name)
        except (OSError, ValueError):
            return
        if problems:
            self._drop(name, f"{name} is corrupt locally ({'; '.join(problems)[:300]}); not uploaded")

    def _next(self) -> str | None:
        with self._lock:
            if not self._pending:
                self._lock.wait(1.0)
                return None
            return self._pending[0]

    def _handle(self, name: str) -> None:
        try:
            record = self.store.read(name)
        except FileNotFoundError:
            self._drop(name, f"{name} is gone from the local store before its upload; not uploaded")
            return
        owner = self.remote.owner(name)
        if owner is not None and owner not in self.lineage:
            # Overwriting it would destroy another run's checkpoint (its best, maybe).
            self._drop(
                name,
                f"{self.remote.url} holds another run's {name} (run {owner!r}): not uploaded; "
                "give each run its own --remote prefix",
            )
            return
        if not self._wanted(record):
            self._drop(name, None)
            log.info("%s is not kept by the remote policy: not uploaded", name)
            return
        with self._lock:
            self._uploading = name
        started = time.monotonic()
        try:
            transfer = self.remote.upload(self.store, name, progress=self._between_files)
        finally:
            with self._lock:
                self._uploading = None
        seconds = time.monotonic() - started
        self._remote_records = None
        with self._lock:
            self._uploaded += 1
            self._last_error = None
            self._last_upload = {"name": name, "bytes": transfer.nbytes, "seconds": round(seconds, 3)}
        self._drop(name, None)
        log.info(
            "uploaded %s to %s (%.1f MiB in %.2f s)", name, self.remote.url, transfer.nbytes / 2**20, seconds
        )
        self._rotate_remote()

    def _between_files(self, _nbytes: int) -> None:
        # A stopping daemon (or a node daemon releasing this run) must not leave a thread
        # uploading behind it: the next daemon of the run resumes from uploads.json.
        if self._stopping.is_set():
            raise _Stopping

    def _wanted(self, record: CheckpointRecord) -> bool:
        """Whether the remote policy keeps ``record`` among what the remote holds and the other
        pending uploads (a checkpoint at a best step always is)."""
        if record.step in self._best_steps():
            return True
        others = [r for r in self._remote() if r.name != record.name]
        return record.name in self.policy.preserve([*others, record])

    def _rotate_remote(self) -> None:
        records = self._remote()
        best_steps = self._best_steps()
        protected = [r.name for r in records if r.step in best_steps]
        for doomed in plan_deletions(records, self.policy, protected):
            self.remote.delete(doomed.name)
            self._remote_deleted += 1
            log.info("rotated out %s from %s", doomed.name, self.remote.url)
        self._remote_records = None

    def _remote(self) -> list[CheckpointRecord]:
        """This run's checkpoints on the remote (a shared prefix's others never count)."""
        if self._remote_records is None:
            self._remote_records = self.remote.list(self.lineage)
        return self._remote_records

    def _drop(self, name: str, error: str | None) -> None:
        with self._lock:
            if name in self._pending:
                self._pending.remove(name)
                self._save_quietly()
        if error is not None:
            self._failed(error)
            with self._lock:
                self._dropped = [*self._dropped, {"name": name, "why": error}][-_DROPPED_SHOWN:]
        self._released()

    def _failed(self, message: str) -> None:
        with self._lock:
            self._last_error = message
        log.error("%s", message)

    def _save_quietly(self) -> None:
        """Record the pending uploads; a failure is reported, not raised: the hold in memory
        stands, and the listing at the next start finds what the remote lacks anyway."""
        try:
            atomic_write_json(self.paths.uploads, {"pending": self._pending}, durable=True)
        except OSError as exc:
            self._last_error = f"cannot record the pending uploads in {self.paths.uploads}: {exc}"
            log.error("%s", self._last_error)


def _load_pending(paths: RunPaths) -> list[str]:
    try:
        return read_pending_uploads(paths)
    except ProtocolError as exc:
        log.error("ignoring the pending uploads: %s", exc)
        return []
