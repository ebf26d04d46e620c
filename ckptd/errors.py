"""The exception family: one type for every error a user can cause.

Each subclasses the built-in that fits (``ValueError`` for bad input,
``OSError`` for filesystem trouble, ``TimeoutError`` for waits) so callers
that already catch built-ins keep working, and each carries its context as
attributes so a caller can act on it without parsing the message.
"""

from __future__ import annotations

from pathlib import Path


class CkptdError(Exception):
    """Base of every error ckptd raises on purpose."""


class ConfigError(CkptdError, ValueError):
    """A setting or command-line option that cannot work."""


class ProtocolError(CkptdError, ValueError):
    """A control or ack file that is malformed or speaks an unknown protocol version."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsupportedLeafError(CkptdError, TypeError):
    """A snapshot state holds a value that cannot be stored (named by its path)."""

    def __init__(self, path: str, value: object, problem: str | None = None) -> None:
        self.path = path
        self.type_name = type(value).__qualname__
        # A supported type holding what cannot be stored (a tensor's dtype or layout) says
        # which; "unsupported type Tensor (supported: torch.Tensor)" would contradict itself.
        self.problem = problem or (
            f"unsupported type {self.type_name} (supported: torch.Tensor, numpy.ndarray, "
            "numpy scalar, dict, list, tuple, str, int, float, bool, None)"
        )
        super().__init__(f"cannot snapshot {path or '<root>'}: {self.problem}")


class DaemonAlreadyRunning(CkptdError, RuntimeError):
    """A second daemon was started for a run that already has one."""

    def __init__(self, run_dir: Path, lock_path: Path, holder: str) -> None:
        self.run_dir = run_dir
        self.lock_path = lock_path
        self.holder = holder
        # Never advise deleting the lock: it is an flock, released by the kernel when its
        # holder dies, so a stale file never blocks; deleting a held one lets a second daemon in.
        super().__init__(f"another ckptd daemon already follows {run_dir}; stop it first ({holder})")


class StoreError(CkptdError, OSError):
    """The checkpoint store refused an operation (bad path, corrupt manifest, ...)."""

    def __init__(
        self, path: Path | str, problem: str, *, action: str | None = None, code: int | None = None
    ) -> None:
        self.path = Path(path)
        self.problem = problem
        self.action = action
        # "cannot <action> <path>: <problem>" says what was being done, not only the errno text.
        super().__init__(f"cannot {action} {self.path}: {problem}" if action else f"{self.path}: {problem}")
        if code is not None:
            self.errno = code  # kept from the OSError it replaces, for callers that test it


class StoreOwned(CkptdError, ValueError):
    """The store belongs to another run: sharing it would let each rotate the other's checkpoints."""

    def __init__(self, store: Path, owner_run_id: str, owner_run_dir: str) -> None:
        self.store = store
        self.owner_run_id = owner_run_id
        self.owner_run_dir = owner_run_dir
        super().__init__(
            f"the store {store} belongs to run {owner_run_id} ({owner_run_dir}); two runs sharing "
            f"one store would rotate out each other's checkpoints. Give this run its own --store, "
            f"or, once that run is over, hand the store over by removing {store}/.ckptd-store.json"
        )


class CorruptCheckpoint(StoreError):
    """A committed checkpoint whose files do not match its manifest."""


class SnapshotError(CkptdError, RuntimeError):
    """A snapshot could not be staged (no free slot, shared memory full, ...)."""


class MalformedLine(CkptdError, ValueError):
    """A log line that cannot be read; ``kind`` groups them for counting (``json``, ``utf8``, ...)."""

    def __init__(self, kind: str, problem: str) -> None:
        self.kind = kind
        self.problem = problem
        super().__init__(f"{kind}: {problem}")
