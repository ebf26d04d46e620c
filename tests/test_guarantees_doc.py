"""docs/guarantees.md names the test behind each promise: every one it names must exist, so a
renamed or deleted test cannot leave a promise quietly unproven."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
NAMED = re.compile(r"`((?:fault/)?test_\w+\.py)(?:::(test_\w+))?")


def test_every_test_the_guarantees_name_exists() -> None:
    text = (ROOT / "docs" / "guarantees.md").read_text()
    named = NAMED.findall(text)
    assert len(named) > 30
    missing = []
    for module, function in named:
        path = ROOT / "tests" / module
        if not path.is_file():
            missing.append(module)
            continue
        defined = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
        if function and function not in defined:
            missing.append(f"{module}::{function}")
    assert not missing, missing


def test_the_readme_links_its_guarantees_to_the_proofs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    anchors = re.findall(r"\(docs/guarantees\.md#([\w-]+)\)", section)
    headings = re.findall(r"^## (.+)$", (ROOT / "docs" / "guarantees.md").read_text(), re.MULTILINE)
    slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}  # GitHub's rule
    assert len(anchors) >= 8 and set(anchors) <= slugs, set(anchors) - slugs
