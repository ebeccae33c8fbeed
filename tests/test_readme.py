"""The README shows the tools' real --help output."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import BIN

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("tool", ["ipfs-execute", "ipfs-mkdir"])
def test_readme_has_the_current_help(tool: str) -> None:
    help_text = subprocess.run([str(BIN / tool), "--help"], capture_output=True, text=True,
                               env=dict(os.environ, COLUMNS="100"), check=True).stdout
    assert help_text.rstrip() in README, f"README's copy of `{tool} --help` is out of date"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "./run test" in README and "run\" test" in ci


def test_readme_lists_every_unfixable_source() -> None:
    from ipfs_execute_magic import sandbox

    for name in sandbox.UNFIXABLE_SOURCES:
        assert f"- `{name}`:" in README, f"README does not list the unfixable source {name}"
