"""Helpers shared by the integration tests."""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.prefix) / "bin"
_made_in_tmp: list[Path] = []


@atexit.register
def _remove_made_in_tmp() -> None:
    # After every fixture has stopped its nodes: the test run leaves nothing in /tmp.
    for path in _made_in_tmp:
        shutil.rmtree(path, ignore_errors=True)


def wait_for(condition: Callable[[], object], seconds: float = 10.0) -> bool:
    """Whether `condition()` became true within `seconds` (polled every 10 ms)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def recursive_pins(kubo_env: dict[str, str]) -> set[str]:
    """What the node pins recursively, as `ipfs pin ls` says."""
    listed = subprocess.run(
        ["ipfs", "pin", "ls", "--type=recursive", "--quiet"],
        env=kubo_env,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(listed.stdout.split())


def left_run_dirs(home: Path) -> list[Path]:
    """Run directories under HOME that no live process holds: what a finished run must not
    leave. (A runner that has run more than once holds one, made for its next run; one being
    made is not held for an instant, so a directory counts only if unheld twice, 0.2 s apart;
    one made ahead by a process killed since, marked unused, is no run's leftover: the next
    run anywhere removes it.)"""
    first = _unheld_run_dirs(home)
    if not first:
        return []
    time.sleep(0.2)
    return [run_dir for run_dir in _unheld_run_dirs(home) if run_dir in first]


def _unheld_run_dirs(home: Path) -> list[Path]:
    from ipfs_execute_magic.sandbox.output_area import UNUSED_MARKER

    runs = home / "runs"
    unheld = []
    for run_dir in sorted(runs.iterdir()) if runs.is_dir() else []:
        try:
            fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue  # gone meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not (run_dir / UNUSED_MARKER).exists():
                unheld.append(run_dir)
        except BlockingIOError:
            pass  # held by a live runner
        finally:
            os.close(fd)
    return unheld


def world_traversable_tmpdir(prefix: str) -> Path:
    # pytest's own tmp dirs are 0700. The sandbox no longer needs more (its directories are
    # bound for it), but some tests run the tool or Kubo as another user (setpriv), and those
    # must reach the files the test made.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    _made_in_tmp.append(path)
    return path


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPFS_EXECUTE_")}
    env["IPFS_EXECUTE_HOME"] = str(home)
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env.update(extra)
    return env


def ipfs_execute(
    home: Path, *args: str, timeout: float = 120, **kwargs
) -> subprocess.CompletedProcess:
    """Run the real `ipfs-execute` console script."""
    return subprocess.run(
        [str(BIN / "ipfs-execute"), *args],
        env=kwargs.pop("env", None) or cli_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


def execute_notebook(sources: list[str], timeout: int = 60):
    """A notebook of these code cells, executed in a real kernel of this venv, as saved."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    NotebookClient(nb, timeout=timeout, kernel_name="python3").execute()
    return nb


def package_copy_for_other_users(base_dir: Path) -> Path:
    """A copy of the package (and pyseccomp, one module file) that any user can read, for a
    test that runs the sandbox as an ordinary user: the checkout may be under /root. Returns
    the directory to put on that user's sys.path."""
    import shutil

    import pyseccomp

    parent = Path(tempfile.mkdtemp(dir=base_dir))
    shutil.copytree(
        Path(__file__).resolve().parents[1] / "ipfs_execute_magic",
        parent / "ipfs_execute_magic",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(pyseccomp.__file__, parent)
    subprocess.run(["chmod", "-R", "a+rX", str(parent)], check=True)
    return parent
