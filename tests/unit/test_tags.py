"""Every TensorBoard tag megaopsd writes is named in the README's metrics table.

Tags are written by several owners (``metrics.step_scalars``, the methods, the refit, ``flops``,
the evaluator); the README's table is the one place that lists them all, and this test keeps it
complete: a new tag without a line there fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TAG = re.compile(r"(train|perf|rollout|teacher|eval|data)/[A-Za-z0-9_./-]+")


def _tags_in_code() -> dict[str, tuple[str, bool]]:
    """Tag -> (the file that writes it, whether it is only the literal prefix of a formatted tag)."""
    found: dict[str, tuple[str, bool]] = {}
    for path in sorted((REPO / "megaopsd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text, prefix = node.value, False
            elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                text, prefix = str(node.values[0].value), True  # f"perf/{phase}_time_s"
            else:
                continue
            if TAG.fullmatch(text):
                found.setdefault(text, (str(path.relative_to(REPO)), prefix))
    return found


def test_every_tag_in_the_code_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Metrics") :]
    section = section[: section.index("\n## ")]
    named = set(re.findall(r"`([a-z]+/[^`]+)`", section))
    missing = sorted(
        f"{tag} ({where})"
        for tag, (where, prefix) in _tags_in_code().items()
        if tag not in named and not (prefix and any(name.startswith(tag) for name in named))
    )
    assert missing == [], missing


def test_the_scan_sees_the_tags_of_every_owner():
    owners = {where for where, _ in _tags_in_code().values()}
    for module in ("metrics.py", "flops.py", "rollout/refit.py", "algorithm/methods/grpo.py", "trainer.py"):
        assert f"megaopsd/{module}" in owners, sorted(owners)
