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

    def __init__(self, path: str, value: object) -> None:
        self.path = path
        self.type_name = type(value).__qualname__
        super().__init__(
            f"cannot snapshot {path or '<root>'}: unsupported type {self.type_name} "
            "(supported: torch.Tensor, dict, list, tuple, str, int, float, bool, None)"
        )


class DaemonAlreadyRunning(CkptdError, RuntimeError):
    """A second daemon was started for a run that already has one."""

    def __init__(self, run_dir: Path, lock_path: Path, holder: str) -> None:
        self.run_dir = run_dir
        self.lock_path = lock_path
        self.holder = holder
        super().__init__(
            f"another ckptd daemon already follows {run_dir} ({holder}); "
            f"stop it first, or remove {lock_path} if you are sure none is running"
        )


class StoreError(CkptdError, OSError):
    """The checkpoint store refused an operation (bad path, corrupt manifest, ...)."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


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
