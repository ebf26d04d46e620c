"""Untrusted text shown on a terminal: every control character made visible."""

from __future__ import annotations

import pytest

from ckptd.text import printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("eval_loss", "eval_loss"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("title\x1b]0;pwned\x07", "title\\x1b]0;pwned\\x07"),
        ("two\nlines\r", "two\\x0alines\\x0d"),
        ("c1\x9bcsi", "c1\\x9bcsi"),
        ("del\x7f tab\t", "del\\x7f tab\\x09"),
        ("accents é ∑ 🙂", "accents é ∑ 🙂"),
        (3.5, "3.5"),
    ],
)
def test_control_characters_become_visible_and_nothing_else_changes(raw: object, shown: str) -> None:
    assert printable(raw) == shown
