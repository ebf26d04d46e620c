"""What a torch-free install says when trainer-side code is imported.

``pip install ckptd`` is the daemon and the CLI, which never import torch; the trainer side
(``ckptd.client``, ``ckptd.integrations``) needs the extra ``ckptd[torch]``. Importing it
without torch raises :class:`TorchMissingError` (a ``ModuleNotFoundError``, so an
``except ImportError`` still catches it) with :data:`TORCH_HINT` as its message.
This module imports only the standard library: the daemon may import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

TORCH_HINT = (
    "ckptd's trainer-side client needs torch: pip install 'ckptd[torch]' "
    "(or install torch as your framework recommends)"
)


class TorchMissingError(ModuleNotFoundError):
    """torch is not installed, and the module being imported needs it."""

    def __init__(self, message: str = TORCH_HINT) -> None:
        super().__init__(message, name="torch")


def is_torch_missing(exc: ImportError) -> bool:
    """Whether ``exc`` says that torch itself is not installed.

    A missing ``torch.something`` means torch is there but incomplete: the hint to install
    it would mislead, so that error is left as it is.
    """
    return isinstance(exc, ModuleNotFoundError) and exc.name == "torch"


@contextmanager
def torch_required() -> Iterator[None]:
    """Wrap the imports of a module that needs torch: a missing torch becomes a
    :class:`TorchMissingError` with the install hint, any other import error stays as it is."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if not is_torch_missing(exc):
            raise
        raise TorchMissingError() from exc
