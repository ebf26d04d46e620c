"""``python -m ckptd`` is the ``ckptd`` command."""

from __future__ import annotations

import sys

from ckptd.cli import main

sys.exit(main())
