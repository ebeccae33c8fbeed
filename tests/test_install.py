"""The base install (`pip install ipfs_execute_magic`, no extras) is enough for the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import cli_env, world_traversable_tmpdir

PROJECT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def base_venv() -> Iterator[Path]:
    """A fresh venv with the project installed from a copy of its source, without extras."""
    work = world_traversable_tmpdir("iex-base-install-")
    source = work / "source"
    shutil.copytree(
        PROJECT,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "out", "artifacts", "*.egg-info", "__pycache__", "build"
        ),
    )
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    yield venv
    shutil.rmtree(work, ignore_errors=True)


def test_the_base_install_has_no_notebook_layer(base_venv: Path) -> None:
    for module in ("IPython", "ipywidgets", "ipykernel", "traitlets"):
        probe = subprocess.run(
            [str(base_venv / "bin" / "python"), "-c", f"import {module}"],
            capture_output=True,
            text=True,
        )
        assert probe.returncode != 0, f"{module} came with the base install"


def test_the_cli_runs_with_the_base_install(
    base_venv: Path, home: Path, busybox_cid: str, empty_cid: str
) -> None:
    env = cli_env(home)
    env["PATH"] = f"{base_venv / 'bin'}:{os.environ['PATH']}"
    env["IPFS_EXECUTE_KUBO"] = str(Path(sys.prefix) / "bin" / "ipfs")
    tool = str(base_venv / "bin" / "ipfs-execute")
    assert subprocess.run([tool, "--version"], capture_output=True, env=env).returncode == 0
    ran = subprocess.run(
        [tool, busybox_cid, empty_cid, "sh", "-c", "echo base-install > /output/where"],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    output = ran.stdout.strip()
    shown = subprocess.run(
        [str(Path(sys.prefix) / "bin" / "ipfs"), "cat", f"{output}/where"],
        capture_output=True,
        text=True,
        env=dict(env, IPFS_PATH=str(home / "kubo")),
    )
    assert shown.stdout == "base-install\n", shown.stderr
    mkdir = subprocess.run(
        [str(base_venv / "bin" / "ipfs-mkdir"), "out", output],
        capture_output=True,
        text=True,
        env=env,
    )
    assert mkdir.returncode == 0, mkdir.stderr
