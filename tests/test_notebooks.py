"""The notebooks in notebooks/ run headless, and what they save is what a reader needs.

Each notebook is executed in a real kernel (nbclient, through the same function `./run demo`
uses) on the session's embedded node, then checked as saved: valid nbformat, no error, every
result carrying the widget plus text/html and text/plain (the untrusted and GitHub fallbacks),
the widget's state saved, and each step's listing naming the files it writes. Executed copies
are kept in artifacts/notebooks/ to look at after a run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

PROJECT = Path(__file__).resolve().parent.parent
NOTEBOOKS = PROJECT / "notebooks"
ARTIFACTS = PROJECT / "artifacts" / "notebooks"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE_MIME = "application/vnd.jupyter.widget-state+json"

sys.path.insert(0, str(PROJECT / "scripts"))
import demo  # noqa: E402  (scripts/demo.py: the headless executor of `./run demo`)

# The files each result's listing must name: notebook -> id of the cell -> names in /output.
EXPECTED: dict[str, dict[str, list[str]]] = {
    "quickstart.ipynb": {"counts": ["counts.txt", "total.txt"], "top": ["top.txt"]},
    "python-analysis.ipynb": {
        "clean": ["checks.json", "daily.csv"],
        "monthly": ["monthly.csv", "normals.csv"],
        "report": ["climate.png", "report.md"],
    },
    "build-image.ipynb": {"install": ["rootfs.tar.gz"], "hello": ["greeting.txt"]},
    "sweep.ipynb": {"split": ["2012.csv", "2013.csv", "2014.csv", "2015.csv"]},
}
# Notebooks that start a Dask cluster: their node must listen for the workers' nodes, so they
# run on a data directory of their own (the session's node runs offline).
ONLINE = {"sweep.ipynb"}


@pytest.fixture(scope="module")
def executed(home: Path, store: Any) -> Iterator[Callable[[str], nbformat.NotebookNode]]:
    """Executes a notebook of notebooks/ once (kept in artifacts/notebooks/), on demand."""
    from helpers import world_traversable_tmpdir

    from ipfs_execute_magic.node import EmbeddedNode
    from ipfs_execute_magic.sandbox import release_stale_outputs
    from ipfs_execute_magic.settings import Settings

    done: dict[str, nbformat.NotebookNode] = {}
    own_homes: list[Path] = []

    def get(name: str) -> nbformat.NotebookNode:
        if name not in done:
            kernel_home = home
            if name in ONLINE:
                kernel_home = world_traversable_tmpdir("iex-notebook-online-")
                own_homes.append(kernel_home)
            with pytest.MonkeyPatch.context() as patch:
                # The kernel uses the session's node, not the caller's API or home.
                for variable in [v for v in os.environ if v.startswith("IPFS_EXECUTE_")]:
                    patch.delenv(variable)
                patch.setenv("IPFS_EXECUTE_HOME", str(kernel_home))
                notebook, error = demo.execute(NOTEBOOKS / name, timeout=300)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            nbformat.write(notebook, ARTIFACTS / name)
            assert error is None, f"{name}: {error} (the cells' output is above)"
            done[name] = notebook
        return done[name]

    try:
        yield get
    finally:
        for own in own_homes:
            EmbeddedNode(Settings(home=own)).stop()
            release_stale_outputs(own / "runs")
            shutil.rmtree(own, ignore_errors=True)


def code_cells(notebook: nbformat.NotebookNode) -> dict[str, nbformat.NotebookNode]:
    return {cell.id: cell for cell in notebook.cells if cell.cell_type == "code"}


def results(cell: nbformat.NotebookNode) -> list[dict[str, Any]]:
    """The mimebundles of a cell's RunResult displays."""
    return [
        output.data
        for output in cell.outputs
        if output.output_type in ("execute_result", "display_data")
        and output.data.get("text/plain", "").startswith("RunResult")
    ]


def test_every_notebook_is_checked() -> None:
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebooks_are_kept_without_outputs(name: str) -> None:
    """Outputs name CIDs of one machine's runs: the repository keeps the notebooks clean."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    for cell in code_cells(notebook).values():
        assert not cell.outputs and cell.execution_count is None, cell.id


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_executes_and_saves_what_readers_need(
    name: str, executed: Callable[[str], nbformat.NotebookNode]
) -> None:
    notebook = executed(name)
    nbformat.validate(notebook)
    cells = code_cells(notebook)
    errors = [
        cell.id
        for cell in cells.values()
        if any(output.output_type == "error" for output in cell.outputs)
    ]
    assert not errors, f"cells with errors: {errors}"

    # Every rich output (results and bound CIDs) has the two fallbacks; results have a widget
    # whose model is in the saved widget state, so a trusted reopen shows it.
    state = notebook.metadata.get("widgets", {}).get(WIDGET_STATE_MIME, {}).get("state", {})
    for cell in cells.values():
        for output in cell.outputs:
            if output.output_type not in ("execute_result", "display_data"):
                continue
            if WIDGET_MIME in output.data:
                assert {"text/html", "text/plain"} <= set(output.data), (cell.id, output.data)
                assert output.data[WIDGET_MIME]["model_id"] in state, cell.id

    # %ipfs_verify re-ran a step without the cache and got the same output.
    verified = [cell for cell in cells.values() if cell.source.startswith("%ipfs_verify")]
    assert verified, f"{name}: no step is verified"
    for cell in verified:
        shown = [output.data for output in cell.outputs if output.output_type == "execute_result"]
        assert shown and "✓ reproducible" in shown[0]["text/plain"], cell.id
        assert "text/html" in shown[0]

    for cell_id, files in EXPECTED[name].items():
        shown = results(cells[cell_id])
        assert len(shown) == 1, f"{name}:{cell_id}: expected one displayed result"
        bundle = shown[0]
        assert WIDGET_MIME in bundle and "✓ exit 0" in bundle["text/plain"]
        listing = [
            line.split()[2]
            for line in bundle["text/plain"].splitlines()
            if line.split()[1:2] in (["B"], ["KiB"], ["MiB"])
        ]
        assert listing == files, f"{name}:{cell_id}: the listing shows {listing}"
        for file in files:
            assert f">{file}</a>" in bundle["text/html"], f"{name}:{cell_id}: {file} not in HTML"


@pytest.mark.integration
def test_python_analysis_report_and_chart(executed: Callable[[str], nbformat.NotebookNode]) -> None:
    """The saved report step shows its PNG inline and its report in the static HTML."""
    notebook = executed("python-analysis.ipynb")
    html = results(code_cells(notebook)["report"])[0]["text/html"]
    assert '<img src="data:image/png;base64,' in html and 'alt="climate.png"' in html
    assert "# Seattle weather, 2012-2015" in html and "1461 daily records" in html
    shown = code_cells(notebook)["show-report"].outputs
    assert any("image/png" in output.get("data", {}) for output in shown)


def stream_text(cell: nbformat.NotebookNode) -> str:
    return "".join(output.text for output in cell.outputs if output.output_type == "stream")


@pytest.mark.integration
def test_sweep_runs_on_the_cluster_and_reruns_only_the_new_year(
    executed: Callable[[str], nbformat.NotebookNode],
) -> None:
    """The --each cell ran one run per year on the workers; when a year was added, its re-run
    executed that year only; the parameter sweep ran on the workers, and again from the cache."""
    import ast

    cells = code_cells(executed("sweep.ipynb"))
    configured = stream_text(cells["cluster"])
    assert "Dask cluster: <Client:" in configured and ", dashboard http://" in configured
    first = stream_text(cells["per-year"])
    assert first.count("✓ ran on node …") == 3 and "cached" not in first
    assert "entries that ran: ['2012.csv', '2013.csv', '2014.csv']" in stream_text(cells["table"])

    rerun = stream_text(cells["rerun"])
    assert "(stale: $dataset changed)" in rerun and "re-ran 1 stale cell" in rerun
    assert rerun.count("✓ cached") == 3 and "2015.csv: ✓ ran on node …" in rerun
    lines = stream_text(cells["which-ran"]).splitlines()
    ran = ast.literal_eval(
        next(line for line in lines if line.startswith("entries that ran:"))[18:]
    )
    assert ran == ["2015.csv"]  # not all four: the three unchanged years came from the cache
    assert "2015   365" in stream_text(cells["which-ran"])

    sweep = stream_text(cells["sweep"]).splitlines()
    rows = [line for line in sweep if line.strip().split(" ")[0] in ("15", "20", "25", "30")]
    # Each threshold ran on a worker's node (its peer ID's end), not here.
    assert len(rows) == 4 and all(re.search(r"  …\w{6}$", row) for row in rows), rows
    assert "answered from the cache here: 4 of 4" in stream_text(cells["sweep-again"])


@pytest.mark.integration
def test_demo_writes_the_executed_notebook_and_html(home: Path, store: Any, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPFS_EXECUTE_")}
    env["IPFS_EXECUTE_HOME"] = str(home)
    proc = subprocess.run(
        [sys.executable, str(PROJECT / "scripts" / "demo.py"), "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "%%ipfs_execute $busybox $data -o counts" in proc.stdout  # cells echoed as they run
    assert "counts.txt" in proc.stdout and "ran in" in proc.stdout
    executed = nbformat.read(tmp_path / "quickstart.ipynb", as_version=4)
    nbformat.validate(executed)
    assert results(code_cells(executed)["top"])
    page = (tmp_path / "quickstart.html").read_text()
    # The results as their static HTML (no widget script needed): status, listing, preview.
    assert page.count('class="ipfs-execute-result"') >= 2
    assert ">counts.txt</a>" in page and ">top.txt</a>" in page
    assert WIDGET_MIME not in page
