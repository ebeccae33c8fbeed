"""A notebook of one's own, outside the repository.

- The README's notebook quickstart, its cells as written, runs in a new kernel of this
  environment's Python (where the package is installed) from an empty directory outside the
  checkout: images come from the package, nothing from the repository.
- `./run demo --out DIR` writes the executed notebook and its HTML to DIR and nothing inside
  the repository.
- `./run lab DIR` serves DIR.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from helpers import world_traversable_tmpdir
from nbformat.v4 import new_code_cell, new_notebook

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "scripts"))
import demo  # noqa: E402  (scripts/demo.py: the headless executor of `./run demo`)

SECTION = re.compile(r"^## Quickstart: a notebook\n(.*?)^## ", re.DOTALL | re.MULTILINE)
CODE_BLOCK = re.compile(r"^```(?:python|text)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def readme_quickstart_cells() -> list[str]:
    section = SECTION.search((PROJECT / "README.md").read_text())
    assert section, "README.md has no '## Quickstart: a notebook' section"
    cells = [block.rstrip("\n") for block in CODE_BLOCK.findall(section.group(1))]
    assert len(cells) >= 3 and cells[0].startswith("%load_ext ipfs_execute_magic"), cells
    return cells


@pytest.fixture()
def session_node(home: Path, store: Any) -> Iterator[None]:
    """Kernels started here use the session's node, not the caller's API or home."""
    with pytest.MonkeyPatch.context() as patch:
        for variable in [v for v in os.environ if v.startswith("IPFS_EXECUTE_")]:
            patch.delenv(variable)
        patch.setenv("IPFS_EXECUTE_HOME", str(home))
        yield


@pytest.fixture()
def empty_dir() -> Iterator[Path]:
    path = world_traversable_tmpdir("iex-own-notebook-")
    assert not path.is_relative_to(PROJECT) and not any(path.iterdir())
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _texts(cell: nbformat.NotebookNode) -> str:
    return "".join(
        output.get("text", "") or output.get("data", {}).get("text/plain", "")
        for output in cell.outputs
    )


def test_readme_notebook_quickstart_runs_from_an_empty_directory(
    session_node: None, empty_dir: Path
) -> None:
    cells = readme_quickstart_cells()
    check = (
        "import os, ipfs_execute_magic as ie\n"
        "print('cwd', os.getcwd())\n"
        "print('image', busybox == ie.images.busybox())\n"
        "print(top.read_text('top.txt'), end='')"
    )
    notebook = new_notebook(cells=[new_code_cell(source) for source in [*cells, check]])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    path = empty_dir / "mine.ipynb"
    nbformat.write(notebook, path)

    executed, error = demo.execute(path, timeout=300)
    assert error is None, f"the README's quickstart failed: {error}"
    outputs = [cell.outputs for cell in executed.cells]
    assert not [o for cell in outputs for o in cell if o.output_type == "error"], outputs
    # Each %%ipfs_execute cell shows its result.
    for cell in executed.cells[1 : len(cells)]:
        assert "RunResult" in _texts(cell), cell.source
    text = _texts(executed.cells[-1])
    assert f"cwd {empty_dir}\n" in text and "image True\n" in text
    counts = [line.split() for line in text.splitlines() if re.match(r"\s*\d+ \w+$", line)]
    assert counts and all(count == "2" for count, _word in counts[:2]), text
    assert {word for _count, word in counts[:2]} == {"to", "be"}
    # What the notebook wrote is its own data; nothing else appeared beside it.
    assert sorted(p.name for p in empty_dir.iterdir()) == ["mine.ipynb", "words"]


def _repository_state() -> dict[str, tuple[int, int]]:
    """Every file the demo could touch: the notebooks, the examples, out/ and build/ (size,
    mtime), plus the names at the top of the checkout."""
    state: dict[str, tuple[int, int]] = {name: (0, 0) for name in os.listdir(PROJECT)}
    for part in ("notebooks", "examples", "out", "build"):
        for path in (PROJECT / part).rglob("*") if (PROJECT / part).exists() else ():
            if "__pycache__" not in path.parts:
                stat = path.lstat()
                state[str(path.relative_to(PROJECT))] = (stat.st_size, stat.st_mtime_ns)
    return state


def test_demo_out_writes_nothing_inside_the_repository(
    session_node: None, empty_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _repository_state()
    out = empty_dir / "demo-out"
    assert demo.main(["--out", str(out)]) == 0, capsys.readouterr().out
    assert _repository_state() == before
    assert sorted(p.name for p in out.iterdir()) == ["quickstart.html", "quickstart.ipynb"]
    executed = nbformat.read(out / "quickstart.ipynb", as_version=4)
    assert not [
        o for cell in executed.cells for o in cell.get("outputs", []) if o.output_type == "error"
    ]


def test_run_lab_serves_the_directory_it_is_given(session_node: None, empty_dir: Path) -> None:
    (empty_dir / "mine.ipynb").write_text(nbformat.writes(new_notebook()))
    state = world_traversable_tmpdir("iex-lab-state-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    env.update(
        JUPYTER_CONFIG_DIR=str(state / "config"),
        JUPYTER_DATA_DIR=str(state / "data"),
        JUPYTER_RUNTIME_DIR=str(state / "runtime"),
    )
    token, port = secrets.token_hex(16), free_port()
    log = state / "lab.log"
    with open(log, "wb") as sink:
        # A relative DIR is the caller's: run from the directory's parent.
        server = subprocess.Popen(
            [
                str(PROJECT / "run"),
                "lab",
                empty_dir.name,
                f"--port={port}",
                "--ServerApp.port_retries=0",
                f"--ServerApp.token={token}",
            ],
            cwd=empty_dir.parent,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"./run lab exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"./run lab not up:\n{log.read_text()[-3000:]}"
            try:
                url = f"http://127.0.0.1:{port}/api/contents?token={token}"
                with urllib.request.urlopen(url, timeout=2) as answer:
                    listing = json.load(answer)
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        assert [entry["name"] for entry in listing["content"]] == ["mine.ipynb"]
        assert f"JupyterLab on {empty_dir}" in log.read_text()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        shutil.rmtree(state, ignore_errors=True)
