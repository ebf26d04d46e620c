"""Untrusted text made safe for a terminal.

Metric names, paths, tags, reasons and errors reach the screen from files anyone may have
written (a log, a manifest, status.json). An escape sequence among them could recolour,
retitle or rewrite the user's terminal, and a newline could forge a line of output. ``printable``
shows every control character as a visible escape instead.
"""

from __future__ import annotations

import re

# C0 controls (tab included: it would break alignment), DEL, and the C1 controls (0x80-0x9f),
# which some terminals honour as escape introducers.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable(value: object) -> str:
    """``str(value)`` with each control character written as ``\\xNN`` (a newline too)."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found[0]):02x}", str(value))
