"""Getting content out: `retrieve`, `ie.get`, `result.download`, `ipfs-execute get` (real node)."""

from __future__ import annotations

import _thread
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ipfs_execute

import ipfs_execute_magic as ie
from ipfs_execute_magic.cid import raw_leaf_cid
from ipfs_execute_magic.errors import EXIT_USAGE, IpfsExecuteError, UsageError
from ipfs_execute_magic.retrieval import retrieve
from ipfs_execute_magic.settings import Settings

BIG = 9 * 1024 * 1024 + 7  # several chunks: progress is reported more than once


def make_tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "deep.txt").write_text("deep\n")
    (root / "empty").mkdir()
    (root / "top.txt").write_text("top\n")
    (root / "big.bin").write_bytes(os.urandom(BIG))
    (root / "link").symlink_to("a/b/deep.txt")
    (root / "escape").symlink_to("/etc/passwd")  # kept as a link, never followed


@pytest.fixture(scope="module")
def tree_cid(store, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tree")
    make_tree(root)
    return store.add_tree(root).cid


@pytest.fixture()
def api(home: Path, store) -> Iterator[Settings]:
    settings = ie.configure(home=home)
    yield settings
    ie.default_runner().close()


def leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if ".tmp-" in name)


def test_a_tree_with_nested_dirs_symlinks_and_an_empty_dir(
    store, tree_cid: str, tmp_path: Path
) -> None:
    dest = tmp_path / "out"
    got = retrieve(store, tree_cid, dest)
    assert got.path == dest and got.kind == "directory" and got.cid == tree_cid
    assert got.files == 3 and got.bytes == BIG + len("deep\n") + len("top\n")
    assert (dest / "a" / "b" / "deep.txt").read_text() == "deep\n"
    assert (dest / "top.txt").read_text() == "top\n"
    assert (dest / "big.bin").stat().st_size == BIG
    assert os.readlink(dest / "link") == "a/b/deep.txt"
    assert os.readlink(dest / "escape") == "/etc/passwd"
    assert (dest / "empty").is_dir() and not os.listdir(dest / "empty")
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "top.txt").stat().st_mode) == 0o644
    assert leftovers(tmp_path) == []


def test_a_single_file_a_sub_path_and_a_symlink(store, tree_cid: str, tmp_path: Path) -> None:
    got = retrieve(store, f"/ipfs/{tree_cid}/a/b/deep.txt", tmp_path / "copy.txt")
    assert got.kind == "file" and got.files == 1 and got.bytes == 5
    assert (tmp_path / "copy.txt").read_text() == "deep\n"
    # Into an existing directory, as `cp` does: named after the last path component.
    got = retrieve(store, f"{tree_cid}/top.txt", tmp_path)
    assert got.path == tmp_path / "top.txt" and got.path.read_text() == "top\n"
    # A sub directory becomes DEST itself.
    got = retrieve(store, f"{tree_cid}/a", tmp_path / "a")
    assert (tmp_path / "a" / "b" / "deep.txt").read_text() == "deep\n"
    # Kubo's stat calls a symlink a file: it must still arrive as a symlink.
    got = retrieve(store, f"{tree_cid}/link", tmp_path / "link")
    assert got.kind == "symlink" and os.readlink(tmp_path / "link") == "a/b/deep.txt"
    assert leftovers(tmp_path) == []


def test_an_existing_destination_is_refused_unless_overwrite(
    store, tree_cid: str, tmp_path: Path
) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "mine").write_text("keep me")
    with pytest.raises(UsageError, match=r"out is a directory that is not empty.*--force"):
        retrieve(store, tree_cid, dest)
    assert os.listdir(dest) == ["mine"]
    (tmp_path / "file.txt").write_text("keep me")
    with pytest.raises(UsageError, match=r"file.txt already exists"):
        retrieve(store, f"{tree_cid}/top.txt", tmp_path / "file.txt")
    assert (tmp_path / "file.txt").read_text() == "keep me"
    # A symlink at DEST is not followed into its target directory.
    (tmp_path / "to-dir").symlink_to(dest)
    with pytest.raises(UsageError, match="already exists"):
        retrieve(store, f"{tree_cid}/top.txt", tmp_path / "to-dir")
    assert os.listdir(dest) == ["mine"]
    # An empty directory is as good as none.
    (tmp_path / "empty").mkdir()
    retrieve(store, f"{tree_cid}/a", tmp_path / "empty")
    assert (tmp_path / "empty" / "b" / "deep.txt").exists()
    # overwrite replaces the whole directory, and a file.
    retrieve(store, tree_cid, dest, overwrite=True)
    assert not (dest / "mine").exists() and (dest / "top.txt").read_text() == "top\n"
    retrieve(store, f"{tree_cid}/top.txt", tmp_path / "file.txt", overwrite=True)
    assert (tmp_path / "file.txt").read_text() == "top\n"
    assert leftovers(tmp_path) == [] and not (tmp_path / ".replaced").exists()


def test_progress_grows_to_the_total(store, tree_cid: str, tmp_path: Path) -> None:
    calls: list[tuple[str, int, int | None]] = []
    retrieve(store, f"{tree_cid}/big.bin", tmp_path / "big", on_progress=lambda *c: calls.append(c))
    done = [call[1] for call in calls]
    assert len(calls) >= 2 and done == sorted(done) and done[-1] == BIG
    assert {call[2] for call in calls} == {BIG}
    assert calls[0][0] == f"/ipfs/{tree_cid}/big.bin"
    calls.clear()
    retrieve(store, tree_cid, tmp_path / "tree", on_progress=lambda *c: calls.append(c))
    done = [call[1] for call in calls]
    assert len(calls) >= 2 and done == sorted(done) and done[-1] > BIG
    assert {call[2] for call in calls} == {None}  # a tree's tar size is not known ahead


def test_nothing_is_left_when_a_block_is_missing(
    store, kubo_env: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "a.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    (source / "b.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    cid = store.add_tree(source, pin=False).cid
    # The node is offline: once b.bin's first block is gone, the fetch fails midway.
    b_cid = next(entry.cid for entry in store.ls(cid) if entry.name == "b.bin")
    first_block = subprocess.run(
        ["ipfs", "refs", b_cid], env=kubo_env, capture_output=True, text=True, check=True
    ).stdout.split()[0]
    subprocess.run(["ipfs", "block", "rm", first_block], env=kubo_env, check=True)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(IpfsExecuteError, match=f"{cid}.*retry"):
        retrieve(store, cid, target / "out")
    assert os.listdir(target) == []


def test_nothing_is_left_when_interrupted(store, tree_cid: str, tmp_path: Path) -> None:
    sent: list[bool] = []

    def interrupt(what: str, done: int, total: int | None) -> None:
        # As Ctrl-C does (the callback may run in the extractor's reading thread).
        if done > 2 * 1024 * 1024 and not sent:  # part of big.bin is written by then
            sent.append(True)
            _thread.interrupt_main()

    for path in (tree_cid, f"{tree_cid}/big.bin"):
        sent.clear()
        with pytest.raises(KeyboardInterrupt):
            retrieve(store, path, tmp_path / "out", on_progress=interrupt)
        assert os.listdir(tmp_path) == []


def test_not_retrievable_names_the_cid(store, tmp_path: Path) -> None:
    missing = raw_leaf_cid(os.urandom(32))  # never added anywhere
    with pytest.raises(IpfsExecuteError, match=missing):
        retrieve(store, missing, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_api_get_and_download(
    api: Settings, busybox_cid: str, tree_cid: str, tmp_path: Path
) -> None:
    assert ie.get(f"{tree_cid}/top.txt", tmp_path / "t") == tmp_path / "t"
    assert (tmp_path / "t").read_text() == "top\n"
    result = ie.run(busybox_cid, None, "sh", "-c", "mkdir /output/d; echo x > /output/d/f")
    assert result.download(tmp_path / "result") == tmp_path / "result"
    assert (tmp_path / "result" / "d" / "f").read_text() == "x\n"
    assert (result / "d").download(tmp_path / "d") == tmp_path / "d"
    assert (tmp_path / "d" / "f").read_text() == "x\n"
    assert ie.get(result, tmp_path / "again") == tmp_path / "again"


def test_cli_get_end_to_end(home: Path, store, tree_cid: str, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    done = ipfs_execute(home, "get", tree_cid, str(dest))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote 3 files, {BIG + 9} bytes to {dest}\n"
    assert done.stderr == ""  # no progress line when stderr is not a terminal
    assert os.readlink(dest / "link") == "a/b/deep.txt"
    again = ipfs_execute(home, "get", tree_cid, str(dest))
    assert again.returncode == EXIT_USAGE
    assert again.stderr.startswith("ipfs-execute: ") and "--force" in again.stderr
    assert len(again.stderr.splitlines()) == 1
    forced = ipfs_execute(home, "get", "--force", f"{tree_cid}/top.txt", str(dest))
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout == f"wrote 1 file, 4 bytes to {dest / 'top.txt'}\n"
    bad = ipfs_execute(home, "get", "not-a-cid", str(tmp_path / "x"))
    assert bad.returncode == EXIT_USAGE and "not a CID" in bad.stderr


def test_magic_ipfs_get(ip, tree_cid: str, tmp_path: Path) -> None:
    from IPython.core.error import UsageError as MagicUsageError

    ip.user_ns["tree"] = tree_cid
    done = ip.run_cell(f"%ipfs_get {{tree}}/top.txt {tmp_path}")
    assert done.error_in_exec is None, done.error_in_exec
    assert done.result == tmp_path / "top.txt" and done.result.read_text() == "top\n"
    done = ip.run_cell(f"%ipfs_get tree {tmp_path / 'tree'}")  # a bound name
    assert done.error_in_exec is None, done.error_in_exec
    assert os.readlink(tmp_path / "tree" / "link") == "a/b/deep.txt"
    again = ip.run_cell(f"%ipfs_get tree {tmp_path / 'tree'}")
    assert isinstance(again.error_in_exec, MagicUsageError)
    assert "--force" in str(again.error_in_exec)
    forced = ip.run_cell(f"%ipfs_get tree {tmp_path / 'tree'} --force")
    assert forced.error_in_exec is None, forced.error_in_exec
