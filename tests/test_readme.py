"""The README and docs/ stay true: the tools' real --help output, the complete list of
unfixable sources, the two commands, links that resolve, and a README that stays short."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import BIN

PROJECT = Path(__file__).resolve().parent.parent
README_PATH = PROJECT / "README.md"
README = README_PATH.read_text()
DOCS = PROJECT / "docs"
# Every Markdown page whose links are checked.
PAGES = [README_PATH, *sorted(DOCS.glob("*.md")), PROJECT / "benchmarks" / "README.md"]
README_MAX_LINES = 180

FENCED_BLOCK = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)


def _links(page: Path) -> list[str]:
    text = FENCED_BLOCK.sub("", page.read_text())
    return LINK.findall(text)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(h) for h in HEADING.findall(FENCED_BLOCK.sub("", page.read_text()))}


@pytest.mark.parametrize("tool", ["ipfs-execute", "ipfs-mkdir"])
def test_cli_doc_has_the_current_help(tool: str) -> None:
    help_text = subprocess.run(
        [str(BIN / tool), "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, COLUMNS="100"),
        check=True,
    ).stdout
    cli_doc = (DOCS / "cli.md").read_text()
    assert help_text.rstrip() in cli_doc, (
        f"docs/cli.md's copy of `{tool} --help` is out of date: "
        ".venv/bin/python scripts/update_cli_help.py refreshes it"
    )


def test_readme_shows_the_two_commands_and_ci_runs_the_test_one() -> None:
    ci = (PROJECT / ".ci" / "run").read_text()
    assert "./run test" in README and "./run demo" in README
    assert 'run" test' in ci


def test_reproducibility_doc_lists_every_unfixable_source() -> None:
    from ipfs_execute_magic import sandbox

    page = (DOCS / "reproducibility.md").read_text()
    for name in sandbox.UNFIXABLE_SOURCES:
        assert f"- `{name}`:" in page, (
            f"docs/reproducibility.md does not list the unfixable source {name}"
        )


def test_readme_stays_short() -> None:
    lines = len(README.splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http:, https:, mailto: ...
        path_part, _, fragment = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in _anchors(linked):
            broken.append(f"{target}: no heading #{fragment} in {linked.relative_to(PROJECT)}")
    assert not broken, f"broken links in {page.relative_to(PROJECT)}: " + "; ".join(broken)
