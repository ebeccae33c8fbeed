"""The demo: execute notebooks/quickstart.ipynb headless on the embedded IPFS node.

Run through `./run demo` (which sets everything up first):

    ./run demo                                   # the quickstart
    ./run demo notebooks/python-analysis.ipynb   # any other notebook
    ./run demo --out DIR                         # somewhere else than out/

The notebook runs in a fresh kernel of this environment's Python, in notebooks/ (the notebooks
use paths relative to it), with the same magics a user gets in JupyterLab. Each cell and its
text output is echoed here as it runs. Written to out/ (gitignored):

    out/NAME.ipynb   the executed notebook: outputs, widget state, every CID
    out/NAME.html    a static HTML export, readable in any browser without a kernel

The shipped notebooks write nothing beside themselves (their images come from %ipfs_image,
built in the data directory): with --out outside the checkout the repository stays as it was.

The IPFS node is the embedded default (`ipfs-execute node status` shows it);
IPFS_EXECUTE_HOME or IPFS_EXECUTE_API choose another, as everywhere.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbformat import NotebookNode
from traitlets.config import Config

PROJECT = Path(__file__).resolve().parent.parent
QUICKSTART = PROJECT / "notebooks" / "quickstart.ipynb"
DEFAULT_OUT = PROJECT / "out"
CELL_TIMEOUT = 600  # seconds; the sandbox's own default limit of one run
ECHO_LINES = 12  # of each output echoed to the terminal


def _indent(text: str, lines: int = ECHO_LINES) -> str:
    shown = text.rstrip("\n").splitlines()
    more = len(shown) - lines
    shown = shown[:lines] + ([f"… {more} more lines"] if more > 0 else [])
    return textwrap.indent("\n".join(shown), "    ")


class Echo:
    """Prints each code cell's first line, then its outputs as text, while the notebook runs."""

    def __init__(self, total: int) -> None:
        self.total = total

    def before(self, cell: NotebookNode, cell_index: int, **_: Any) -> None:
        first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
        print(f"[{cell_index + 1}/{self.total}] {first}", flush=True)

    def after(self, cell: NotebookNode, **_: Any) -> None:
        for output in cell.get("outputs", []):
            kind = output.output_type
            if kind == "stream":
                text = output.text
            elif kind == "error":
                text = f"{output.ename}: {output.evalue}"
            else:
                text = output.get("data", {}).get("text/plain", "")
            if text.strip():
                print(_indent(text), flush=True)


def execute(path: Path, timeout: float = CELL_TIMEOUT) -> tuple[NotebookNode, str | None]:
    """Run every cell in a new kernel in the notebook's directory; (notebook, error or None).

    The kernel is `python3` as this environment resolves it: its own interpreter, so the
    magics installed here. A failing cell stops the run; the notebook up to it is returned.
    """
    notebook = nbformat.read(path, as_version=4)
    echo = Echo(len(notebook.cells))
    # Unix sockets in a private directory instead of loopback TCP: no other user of the
    # machine can reach the kernel (an absolute path: the kernel runs in the notebook's dir).
    sockets = Path(tempfile.mkdtemp(prefix="ipfs-execute-demo-"))
    config = Config({"KernelManager": {"transport": "ipc", "ip": str(sockets / "kernel")}})
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        config=config,
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_execute=echo.before,
        on_cell_executed=echo.after,
    )
    try:
        client.execute()
    except CellExecutionError as error:
        # The message repeats the cell and the traceback; the echo above showed them already.
        return notebook, str(error).strip().splitlines()[-1]
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    return notebook, None


def to_html(notebook: NotebookNode) -> str:
    """A static HTML page of the executed notebook.

    Without widget state nbconvert shows each result's own text/html (status, CIDs, listing,
    previews): the page then needs no widget script from the network to show the results.
    """
    from nbconvert import HTMLExporter

    static = copy.deepcopy(notebook)
    static.metadata.pop("widgets", None)
    body, _resources = HTMLExporter(template_name="lab").from_notebook_node(static)
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "notebook",
        nargs="?",
        type=Path,
        default=QUICKSTART,
        help="the notebook to run (default: notebooks/quickstart.ipynb)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="where the executed notebook and its HTML go (default: out/)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=CELL_TIMEOUT,
        help=f"seconds one cell may take (default {CELL_TIMEOUT})",
    )
    options = parser.parse_args(argv)
    source = options.notebook.resolve()
    if not source.is_file():
        parser.error(f"no such notebook: {options.notebook}")
    node = os.environ.get("IPFS_EXECUTE_API") or "the embedded IPFS node"
    print(f"demo: executing {_shown(source)} on {node}", flush=True)

    started = time.monotonic()
    notebook, error = execute(source, options.timeout)
    elapsed = time.monotonic() - started

    options.out.mkdir(parents=True, exist_ok=True)
    executed = options.out / source.name
    page = executed.with_suffix(".html")
    nbformat.write(notebook, executed)
    page.write_text(to_html(notebook), encoding="utf-8")
    print(f"\ndemo: {_shown(source)} {'failed' if error else 'ran'} in {elapsed:.1f} s")
    print(f"  {_shown(executed):<28} the executed notebook (outputs, widget state, CIDs)")
    print(f"  {_shown(page):<28} a static HTML export: open it in any browser")
    print("  ./run lab                    the notebooks in JupyterLab, to change and re-run")
    if error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 1
    return 0


def _shown(path: Path) -> str:
    """A path relative to the project when inside it (shorter, and what the README says)."""
    try:
        return str(path.resolve().relative_to(PROJECT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    raise SystemExit(main())
