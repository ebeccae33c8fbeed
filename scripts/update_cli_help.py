"""Refresh the copies of `ipfs-execute --help` and `ipfs-mkdir --help` in docs/cli.md.

    .venv/bin/python scripts/update_cli_help.py

tests/test_readme.py fails when they are out of date.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

CLI_DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
BIN = Path(sys.prefix) / "bin"


def main() -> None:
    text = CLI_DOC.read_text()
    for tool in ("ipfs-execute", "ipfs-mkdir"):
        help_text = subprocess.run(
            [str(BIN / tool), "--help"],
            capture_output=True,
            text=True,
            env=dict(os.environ, COLUMNS="100"),
            check=True,
        ).stdout
        # The first ```text block whose first line is this tool's usage line.
        pattern = re.compile(r"```text\nusage: " + re.escape(tool) + r" .*?\n```", re.DOTALL)
        match = pattern.search(text)
        if match is None:
            sys.exit(f"no ```text block with `{tool} --help` in {CLI_DOC}")
        replacement = "```text\n" + help_text.rstrip() + "\n```"
        text = text[: match.start()] + replacement + text[match.end() :]
    CLI_DOC.write_text(text)


if __name__ == "__main__":
    main()
