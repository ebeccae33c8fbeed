"""The example images as part of the package: ie.images, `ipfs-execute image`, %ipfs_image.

An image is built on first use into the data directory (HOME/images), with the same bytes and
CID as `examples/build` gives, and a later call only looks it up: a rebuild only when the
tarball is gone, the node adds it again when it lost the CID, and concurrent first uses
build once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfs_execute_magic.images import builders, catalog
from ipfs_execute_magic.node import EmbeddedNode
from ipfs_execute_magic.settings import Settings
from ipfs_execute_magic.store import Store

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPFS_EXECUTE_")}
    env.pop("SOURCE_DATE_EPOCH", None)  # it would change every image, on purpose
    env["IPFS_EXECUTE_HOME"] = str(home)
    env["PATH"] = f"{BIN}:{env['PATH']}"
    return env


@pytest.fixture()
def own_home(scratch: Path) -> Iterator[Settings]:
    """A data directory and node of its own: what is built or lost here touches no other test."""
    settings = Settings(home=scratch / "home")
    yield settings
    EmbeddedNode(settings).stop()


def test_package_data_ships_every_file_the_builders_read() -> None:
    """A non-editable install has the locks and init scripts: pyproject's package-data names
    every non-Python file of ipfs_execute_magic/images (a wheel built from it was checked to
    hold them)."""
    config = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["ipfs_execute_magic.images"]
    data = [p for p in builders.HERE.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert {p.name for p in data} >= {"busybox.lock", "python.lock", "busybox-init"}
    for path in data:
        assert any(path.match(glob) for glob in globs), f"{path.name} is not package data"
    for used in (builders.BUSYBOX_LOCK, builders.PYTHON_LOCK, builders.PKG_INSTALL_INIT):
        assert used.parent == builders.HERE and used.is_file()


def test_unknown_image_names_are_one_line_usage_errors() -> None:
    from ipfs_execute_magic.errors import UsageError

    assert catalog.canonical_name("pkg_install") == "pkg-install"
    with pytest.raises(UsageError, match="unknown image 'busybx': choose one of busybox"):
        catalog.canonical_name("busybx")
    proc = subprocess.run(
        [str(BIN / "ipfs-execute"), "image", "build", "busybx"],
        capture_output=True,
        text=True,
        env=_env(Path("/nonexistent-home")),
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "ipfs-execute: unknown image 'busybx': choose one of busybox, empty, python, pkg-install"
    ]


def test_images_have_the_cids_examples_build_gives(home: Path, store: Store, scratch: Path) -> None:
    """Same bytes, same CID: the package's build into the data directory and examples/build
    (the repository's command, its tarball added with `ipfs-execute add`)."""
    settings = Settings(home=home)
    for name in ("busybox", "python", "pkg-install", "empty"):
        proc = subprocess.run(
            [sys.executable, str(PROJECT / "examples" / "build"), name],
            capture_output=True,
            text=True,
            env={**_env(home), "IPFS_EXECUTE_BUILD_DIR": str(scratch / "build")},
        )
        assert proc.returncode == 0, proc.stderr
        assert catalog.ensure(name, settings, store) == proc.stdout.strip(), name
    record = json.loads((home / "images" / "python.json").read_text())
    tarball = home / "images" / "python.tar.gz"
    assert record["sha256"] == catalog._sha256(tarball)
    assert tarball.read_bytes() == (scratch / "build" / "images" / "python.tar.gz").read_bytes()


def test_a_second_call_is_a_lookup_and_a_lost_tarball_or_cid_is_restored(
    own_home: Settings,
) -> None:
    with Store.connect(own_home) as store:
        said: list[str] = []
        cid = catalog.ensure("busybox", own_home, store, on_progress=said.append)
        assert any("building" in line for line in said)
        tarball = own_home.home / "images" / "busybox.tar.gz"
        built = tarball.stat().st_mtime_ns

        said.clear()
        started = time.monotonic()
        assert catalog.ensure("busybox", own_home, store, on_progress=said.append) == cid
        assert time.monotonic() - started < 0.5 and said == []
        assert tarball.stat().st_mtime_ns == built

        # The node lost it (unpinned, collected): the kept tarball is added again, not rebuilt.
        env = {**os.environ, "IPFS_PATH": str(own_home.repo_dir)}
        env["PATH"] = f"{BIN}:{env['PATH']}"
        subprocess.run(["ipfs", "pin", "rm", cid], env=env, check=True, capture_output=True)
        store.repo_gc()
        assert not store.is_pinned(cid)
        assert catalog.ensure("busybox", own_home, store, on_progress=said.append) == cid
        assert store.is_pinned(cid) and tarball.stat().st_mtime_ns == built
        assert len(said) == 1 and "adding" in said[0] and "building" not in said[0], said

        # The tarball is gone: built again, to the same CID.
        said.clear()
        tarball.unlink()
        assert catalog.ensure("busybox", own_home, store, on_progress=said.append) == cid
        assert any("building" in line for line in said) and tarball.is_file()
        assert [info.cid for info in catalog.list_images(own_home) if info.name == "busybox"] == [
            cid
        ]


def test_concurrent_first_uses_build_once_and_the_cli_prints_only_the_cid(
    own_home: Settings,
) -> None:
    """Two processes ask for the python image at once in a fresh data directory: one builds,
    the other waits on the lock and finds the record; both print the same CID."""
    env = _env(own_home.home)
    command = [str(BIN / "ipfs-execute"), "image", "build", "python"]
    procs = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=240) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    cids = {out.strip() for out, _err in outputs}
    assert len(cids) == 1 and all(len(out.split()) == 1 for out, _err in outputs), outputs
    builds = sum(err.count("building") for _out, err in outputs)
    assert builds == 1, outputs

    listed = subprocess.run(
        [str(BIN / "ipfs-execute"), "image", "list"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    lines = {line.split()[0]: line for line in listed.splitlines()}
    assert cids.pop() in lines["python"] and "not built" in lines["busybox"]


def test_api_and_magic_bind_the_image_cid(ip, home: Path, store: Store) -> None:
    import ipfs_execute_magic as ie
    from ipfs_execute_magic.result import IpfsRef

    cid = ie.images.busybox()
    assert isinstance(cid, IpfsRef) and cid == catalog.ensure("busybox", Settings(home=home), store)
    assert ie.images.empty() == store.empty_directory()

    ip.user_ns.pop("busybox", None)
    result = ip.run_line_magic("ipfs_image", "busybox")
    assert ip.user_ns["busybox"] == cid == result
    ip.run_line_magic("ipfs_image", "busybox -o rootfs")
    assert ip.user_ns["rootfs"] == cid
    ran = ip.run_cell("%ipfs_image busybx")
    assert "unknown image 'busybx'" in str(ran.error_in_exec)
