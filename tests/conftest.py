"""Shared fixtures: one real embedded Kubo node and one data directory for the whole session.

Nothing here is skipped for a missing tool: `./run test` installs bwrap, Kubo and the rest,
and a missing tool is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import world_traversable_tmpdir as _world_traversable_tmpdir


@pytest.fixture(scope="session")
def home() -> Iterator[Path]:
    path = _world_traversable_tmpdir("iex-home-")
    yield path
    from ipfs_execute_magic.node import EmbeddedNode
    from ipfs_execute_magic.sandbox import release_stale_outputs
    from ipfs_execute_magic.settings import Settings

    EmbeddedNode(Settings(home=path)).stop()
    # A run whose process a test killed outright leaves its /output image mounted.
    release_stale_outputs(path / "runs")
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(home: Path):
    from ipfs_execute_magic.settings import Settings

    return Settings(home=home)


@pytest.fixture(scope="session")
def store(settings):
    from ipfs_execute_magic.store import Store

    with Store.connect(settings) as connected:
        yield connected


@pytest.fixture(scope="session")
def kubo_env(home: Path, store) -> dict[str, str]:
    """Environment for running the Kubo CLI against the embedded node."""
    env = dict(os.environ)
    env["IPFS_PATH"] = str(home / "kubo")
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}:{env['PATH']}"
    return env


@pytest.fixture()
def scratch() -> Iterator[Path]:
    path = _world_traversable_tmpdir("iex-scratch-")
    yield path
    subprocess.run(["chmod", "-R", "u+rwX", str(path)], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def image_dir() -> Path:
    path = _world_traversable_tmpdir("iex-images-")
    return path


@pytest.fixture(scope="session")
def busybox_tarball(image_dir: Path) -> Path:
    from ipfs_execute_magic.images import builders as images

    return images.build_busybox(image_dir)


@pytest.fixture(scope="session")
def busybox_cid(store, busybox_tarball: Path) -> str:
    return store.add_path(busybox_tarball)


@pytest.fixture(scope="session")
def empty_cid(store) -> str:
    return store.empty_directory()


# Fixtures that bring up a real part: the Kubo node, a sandbox, an IPython shell.
_REAL_PART_FIXTURES = frozenset(
    {
        "home",
        "settings",
        "store",
        "kubo_env",
        "image_dir",
        "busybox_tarball",
        "busybox_cid",
        "empty_cid",
        "ip",
        "run",
        "rootfs",
        "input_dir",
        "base_dir",
    }
)


def pytest_collection_modifyitems(config, items) -> None:
    """The tiers: a test that needs a real part is `slow`, so `-m "not slow"` keeps the pure
    logic tests, which run in seconds. A test may also be marked slow by hand."""
    for item in items:
        if (
            item.get_closest_marker("integration")
            or item.get_closest_marker("browser")
            or _REAL_PART_FIXTURES & set(getattr(item, "fixturenames", ()))
        ):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skipped test is a failure: the set-up installs every tool the suite needs, and
    a skip that hides a missing one would pass a broken machine off as green."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped in CI, which must run everything: {reason}"


@pytest.fixture(scope="module")
def ip(home: Path, store, busybox_cid: str, empty_cid: str):
    """An in-process IPython shell with the extension loaded, on the session's node."""
    from IPython.core.interactiveshell import InteractiveShell

    import ipfs_execute_magic as ie

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "ipfs_execute_magic")
    shell.run_line_magic("config", f"IpfsExecuteMagics.home = {str(home)!r}")
    magics = shell.magics_manager.registry["IpfsExecuteMagics"]
    # An earlier module may have set the same home already: then %config changes nothing and
    # rebuilds nothing, and a Runner it dropped would come back from the environment.
    magics.apply_settings()
    assert ie.default_runner().settings.home == home
    shell.user_ns.update(busybox=busybox_cid, empty=empty_cid)
    # The shell is one instance for the whole session: each module starts with no cells run,
    # so that no module re-runs (%ipfs_rerun_stale) what another left stale.
    magics.ledger = type(magics.ledger)()
    yield shell
    ie.default_runner().close()
    magics.apply_settings()  # a fresh Runner (it connects on first use) on the session's node
