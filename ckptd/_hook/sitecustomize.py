"""ckptd's start-up hook for the processes ``ckptd sidecar`` runs (docs/architecture.md).

Python's ``site`` imports ``sitecustomize`` at start-up from the first sys.path folder that
has one; ``ckptd sidecar`` puts this file's folder first on its child's PYTHONPATH, so this
runs in every Python process of the child's tree (every rank under torchrun). It:

1. when ``CKPTD_HOOK=1``, puts a finder first on ``sys.meta_path`` that acts on the trainer
   modules only (``transformers.trainer``, Lightning's ``trainer.trainer``): right after such
   a module is executed, its ``Trainer.__init__`` is wrapped in place, so every Trainer (or
   subclass) constructed gets exactly one ckptd callback. The class keeps its identity and
   ``inspect.signature`` (``functools.wraps`` sets ``__wrapped__``);
2. executes the ``sitecustomize`` the environment had without us: the next one on sys.path.

Cost when no trainer is imported: one dict lookup per import. Nothing from ckptd, torch or
transformers is imported here; the callback's module is imported when the first Trainer is
constructed. It never raises: an error is printed once to stderr and the process runs
without the callback (``CKPTD_HF_CALLBACK=module:Class``, ``CKPTD_LIGHTNING_CALLBACK=module:Class``
name other callback classes).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing would cost ~5 ms in every process
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

_ENV_HOOK = "CKPTD_HOOK"
_ENV_HF_CALLBACK = "CKPTD_HF_CALLBACK"
_HF_CALLBACK = "ckptd.integrations.hf:CkptdCallback"
_ENV_LIGHTNING_CALLBACK = "CKPTD_LIGHTNING_CALLBACK"
_LIGHTNING_CALLBACK = "ckptd.integrations.lightning:CkptdCallback"
_MARK = "__ckptd_hook__"  # set on our finder and on each wrapped __init__: never twice

_warned = False


def _warn(what: str, exc: BaseException, then: str = "this process runs without ckptd's callback") -> None:
    """Once per process: the training must go on, unhooked, and say so."""
    global _warned
    if _warned:
        return
    _warned = True
    try:
        print(f"ckptd hook: warning: {what}: {type(exc).__name__}: {exc}; {then}", file=sys.stderr)
        sys.stderr.flush()
    except Exception:
        return  # a closed stderr is no reason to stop a training run


# -- what is added to each Trainer ------------------------------------------------------------


def _load(spec: str) -> Any:
    import importlib

    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"{spec!r} is not MODULE:CLASS")
    return getattr(importlib.import_module(module_name), name)


def add_hf_callback(trainer: Any) -> None:
    """``trainer.add_callback(CkptdCallback())``, unless one is already there."""
    callback_cls = _load(os.environ.get(_ENV_HF_CALLBACK) or _HF_CALLBACK)
    if any(isinstance(cb, callback_cls) for cb in trainer.callback_handler.callbacks):
        return
    trainer.add_callback(callback_cls())


def add_lightning_callback(trainer: Any) -> None:
    """Add ``CkptdCallback()`` (``ckptd.integrations.lightning``, or the class
    ``CKPTD_LIGHTNING_CALLBACK`` names) to ``trainer.callbacks``, unless one is already there;
    before the checkpoint callbacks, which Lightning runs last."""
    callback_cls = _load(os.environ.get(_ENV_LIGHTNING_CALLBACK) or _LIGHTNING_CALLBACK)
    callbacks = trainer.callbacks
    if any(isinstance(cb, callback_cls) for cb in callbacks):
        return
    at = next((i for i, cb in enumerate(callbacks) if _is_checkpoint_callback(cb)), len(callbacks))
    callbacks.insert(at, callback_cls())


def _is_checkpoint_callback(callback: Any) -> bool:
    # Lightning's ``Checkpoint`` base (ModelCheckpoint's), named, not imported.
    return any(
        base.__name__ == "Checkpoint" and base.__module__.endswith(".callbacks.checkpoint")
        for base in type(callback).__mro__
    )


_TARGETS: dict[str, Callable[[Any], None]] = {
    "transformers.trainer": add_hf_callback,
    "lightning.pytorch.trainer.trainer": add_lightning_callback,
    "pytorch_lightning.trainer.trainer": add_lightning_callback,
}


# -- patching ------------------------------------------------------------------------------------


def _patch_module(module: ModuleType, add: Callable[[Any], None]) -> None:
    cls = module.__dict__.get("Trainer")
    if isinstance(cls, type):
        _patch_init(cls, add)


def _patch_init(cls: type, add: Callable[[Any], None]) -> None:
    """Wrap ``cls.__init__`` in place: the class object, its bases and subclasses stay as
    they are; a subclass whose ``__init__`` calls ``super().__init__`` gets one callback."""
    import functools

    original = cls.__dict__.get("__init__")
    if not callable(original) or getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)  # the user's errors stay the user's
        try:
            add(self)
        except Exception as exc:
            _warn(f"could not add ckptd's callback to {type(self).__name__}", exc)
        return result

    setattr(__init__, _MARK, True)
    setattr(cls, "__init__", __init__)  # noqa: B010 (mypy refuses assigning to __init__)


class _PatchingLoader:
    """The trainer module's own loader, plus the patch right after the module is executed.
    Everything else (get_source, resources, ...) is the real loader's."""

    def __init__(self, loader: Any, add: Callable[[Any], None]) -> None:
        self._loader = loader
        self._add = add

    def __getattr__(self, name: str) -> Any:
        if name == "_loader":  # not set yet (a copy being built): no endless recursion
            raise AttributeError(name)
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            # From now on the module names its real loader, as if we had never been here.
            module.__loader__ = self._loader
            if module.__spec__ is not None:
                module.__spec__.loader = self._loader
        try:
            _patch_module(module, self._add)
        except Exception as exc:
            _warn(f"could not patch {module.__name__}.Trainer", exc)


class _CkptdImportHook:
    """A ``sys.meta_path`` finder for the trainer modules only: it asks the finders after it
    for the module's spec and wraps the spec's loader."""

    __ckptd_hook__ = True

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        add = _TARGETS.get(fullname)
        if add is None:
            return None  # every other import: this lookup is all it costs
        try:
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None)
                if getattr(finder, _MARK, False) or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is None:
                    continue
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, add)
                return spec
        except Exception as exc:
            _warn(f"could not hook the import of {fullname}", exc)
        return None  # the import system goes on with the other finders, unhooked


def _install() -> None:
    if any(getattr(finder, _MARK, False) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _CkptdImportHook())
    for name, add in _TARGETS.items():
        module = sys.modules.get(name)
        if module is not None:  # imported before us (a chained sitecustomize did it)
            _patch_module(module, add)


# -- chaining the sitecustomize we shadow ------------------------------------------------------


def _chain() -> None:
    """Execute the next ``sitecustomize`` on sys.path after our folder, as site would have."""
    from importlib.machinery import PathFinder

    here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    after: list[str] = []
    seen = False
    for entry in sys.path:
        if not isinstance(entry, str):
            continue
        if os.path.realpath(entry or ".") == here:
            seen = True  # a nested sidecar puts us there twice: skip every copy
        elif seen:
            after.append(entry)
    spec = PathFinder.find_spec("sitecustomize", after) if seen else None
    if spec is None or spec.loader is None:
        return
    from importlib.util import module_from_spec

    module = module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # what site itself does with a failing sitecustomize
        print(
            f"Error in sitecustomize ({spec.origin}, chained by ckptd's hook); "
            f"set PYTHONVERBOSE for traceback:\n{type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        if sys.flags.verbose:
            sys.excepthook(type(exc), exc, exc.__traceback__)
    globals()["chained"] = module


def _main() -> None:
    if os.environ.get(_ENV_HOOK) == "1":
        # First: a chained sitecustomize that imports transformers is hooked too.
        try:
            _install()
        except Exception as exc:
            _warn("could not install the import hook", exc)
    try:
        _chain()
    except Exception as exc:
        _warn("could not look for the sitecustomize this environment had", exc, "it was not run")


if __name__ == "sitecustomize":
    _main()
