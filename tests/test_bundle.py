"""A notebook shared as one CAR file between data directories that share nothing.

Two embedded nodes, each with its own data directory and key, never connected: whatever the
recipient gets, it gets from the bundle. Real Kubo (dag export/import), real bwrap, real
kernels.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from helpers import ipfs_execute, world_traversable_tmpdir

from ipfs_execute_magic.bundle import import_bundle, share
from ipfs_execute_magic.node import EmbeddedNode
from ipfs_execute_magic.record import RunRequest
from ipfs_execute_magic.runner import Runner
from ipfs_execute_magic.settings import Settings

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "scripts"))
import demo  # noqa: E402  (the headless executor of `./run demo`)

RUN_CELLS = ("clean", "monthly", "report")  # the %%ipfs_execute cells of python-analysis


@pytest.fixture()
def two_homes() -> Iterator[tuple[Path, Path]]:
    """Two data directories, each with its own embedded node (started on first use)."""
    homes = (world_traversable_tmpdir("iex-author-"), world_traversable_tmpdir("iex-reader-"))
    yield homes
    for home in homes:
        EmbeddedNode(Settings(home=home)).stop()
        shutil.rmtree(home, ignore_errors=True)


def _execute(path: Path, home: Path) -> nbformat.NotebookNode:
    with pytest.MonkeyPatch.context() as patch:
        for variable in [v for v in os.environ if v.startswith("IPFS_EXECUTE_")]:
            patch.delenv(variable)
        patch.setenv("IPFS_EXECUTE_HOME", str(home))
        notebook, error = demo.execute(path, timeout=300)
    assert error is None, error
    return notebook


def _runs(notebook: nbformat.NotebookNode) -> dict[str, tuple[str, str, str]]:
    """cell id -> (record CID, output CID, text) of each %%ipfs_execute cell's result."""
    found = {}
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            meta = output.get("metadata", {}).get("ipfs_execute", {})
            if cell.get("id") in RUN_CELLS and meta.get("record"):
                found[cell.id] = (meta["record"], meta["output"], output["data"]["text/plain"])
    return found


def _notebook_of(path: Path, *record_cids: str) -> Path:
    """A saved notebook whose cells show these runs (as the magic saves them)."""
    cells = [
        {
            "cell_type": "code",
            "execution_count": index + 1,
            "metadata": {},
            "source": "",
            "outputs": [
                {
                    "output_type": "display_data",
                    "data": {"text/plain": "RunResult"},
                    "metadata": {"ipfs_execute": {"record": cid}},
                }
            ],
        }
        for index, cid in enumerate(record_cids)
    ]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4}))
    return path


@pytest.mark.integration
def test_a_notebook_shared_as_a_car_is_verified_and_then_all_hits(two_homes) -> None:
    author, reader = two_homes
    # The author executes the notebook and shares it: one CAR file beside it.
    executed = _execute(PROJECT / "notebooks" / "python-analysis.ipynb", author)
    made = _runs(executed)
    assert sorted(made) == sorted(RUN_CELLS)
    saved = author / "python-analysis.ipynb"
    nbformat.write(executed, saved)
    shared = ipfs_execute(author, "share", str(saved))
    assert shared.returncode == 0, shared.stderr
    car = author / "python-analysis.car"
    assert f"wrote {car}" in shared.stdout and car.stat().st_size > 1_000_000
    author_key = ipfs_execute(author, "trust", "key").stdout.strip()
    EmbeddedNode(Settings(home=author)).stop()  # nothing can come from the author's node now

    # The recipient: import, trust the author, verify every cell.
    copy = reader / "python-analysis.ipynb"
    shutil.copy(saved, copy)
    imported = ipfs_execute(reader, "import", str(car))
    assert imported.returncode == 0, imported.stderr
    assert "imported bundle" in imported.stdout and "3 cached runs" in imported.stdout
    assert f"signed by {author_key}: not trusted" in imported.stdout
    assert imported.stderr == ""  # nothing rejected
    assert ipfs_execute(reader, "trust", "add", author_key, "--name", "author").returncode == 0
    verified = ipfs_execute(reader, "verify", str(copy), timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.count("verdict: reproducible") == 3
    assert verified.stdout.count("reproduced by 2 keys, 2 trusted") == 3
    # Lineage crosses the composed input of the report step: its notes came in the bundle.
    lineage = ipfs_execute(reader, "lineage", made["report"][1])
    assert lineage.returncode == 0, lineage.stderr
    assert made["clean"][0] in lineage.stdout and made["monthly"][0] in lineage.stdout

    # Executing the notebook now starts no sandbox for those cells: each result is the
    # author's record itself (a run here would have written a record of its own).
    again = _runs(_execute(PROJECT / "notebooks" / "python-analysis.ipynb", reader))
    for cell in RUN_CELLS:
        record, _output, text = again[cell]
        assert record == made[cell][0], cell
        assert "cached" in text, (cell, text)


def test_bundle_files_are_streamed(settings, store, busybox_cid: str, scratch: Path) -> None:
    """Writing and importing a bundle of 48 MiB holds a few MiB at most in this process."""
    big = scratch / "data"
    big.mkdir()
    with open(big / "noise.bin", "wb") as out:
        for _ in range(48):
            out.write(os.urandom(1 << 20))
    reader = world_traversable_tmpdir("iex-reader-")
    with Runner(settings) as runner:
        data = store.add_path(big)
        made = runner.run(RunRequest(busybox_cid, data, script="wc -c < /input/noise.bin"))
        notebook = _notebook_of(scratch / "big.ipynb", made.record_cid or "")
        tracemalloc.start()
        try:
            shared = share(runner, notebook)
            exported_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert shared.car == scratch / "big.car" and shared.car_bytes > 48 << 20
    assert exported_peak < 8 << 20, exported_peak
    try:
        with Runner(Settings(home=reader)) as recipient:
            recipient.store.version()  # start the node outside the measurement
            tracemalloc.start()
            try:
                imported = import_bundle(recipient, shared.car)
                imported_peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert imported.root == shared.root and imported.report.added == 1
            # Pinned with the root: the data is the recipient's own copy now.
            assert recipient.store.is_pinned(shared.root)
            assert recipient.store.stat(data).size > 48 << 20
        assert imported_peak < 8 << 20, imported_peak
    finally:
        EmbeddedNode(Settings(home=reader)).stop()
        shutil.rmtree(reader, ignore_errors=True)


def test_share_to_an_unconfigured_pinning_service_says_so_in_one_line(
    home: Path, store, busybox_cid: str, scratch: Path
) -> None:
    with Runner(Settings(home=home)) as runner:
        made = runner.run(RunRequest(busybox_cid, script="echo pinned > /output/p"))
    notebook = _notebook_of(scratch / "n.ipynb", made.record_cid or "")
    proc = ipfs_execute(home, "share", str(notebook), "--pin-remote", "nowhere")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no remote pinning service named 'nowhere'" in lines[0]
    assert "ipfs pin remote service add" in lines[0]
    assert not (scratch / "n.car").exists()  # --pin-remote alone writes no file


def test_import_of_a_car_that_is_not_a_bundle_is_refused(
    home: Path, store, empty_cid: str, scratch: Path
) -> None:
    car = scratch / "plain.car"
    store.dag_export(empty_cid, car)
    proc = ipfs_execute(home, "import", str(car))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "is not an ipfs-execute bundle" in proc.stderr
    missing = ipfs_execute(home, "import", str(scratch / "nothing.car"))
    assert missing.returncode == 2 and "no such bundle" in missing.stderr


def test_share_magic_and_api(ip, scratch: Path, capsys) -> None:
    import ipfs_execute_magic as ie

    assert ip.run_cell("%%ipfs_execute $busybox -o shared_run\necho shared > /output/s").success
    record = ip.user_ns["shared_run"].record_cid
    notebook = _notebook_of(scratch / "magic.ipynb", record)
    capsys.readouterr()
    ip.run_line_magic("ipfs_share", f"{notebook} -o {scratch / 'out.car'}")
    assert f"wrote {scratch / 'out.car'}" in capsys.readouterr().out
    imported = ie.import_bundle(scratch / "out.car")  # the same node: nothing new
    assert imported.report.added == 0 and imported.report.already_present == 1
    assert imported.notebook_name == "magic.ipynb"
    shared = ie.share(notebook)
    assert shared.car == scratch / "magic.car" and shared.root == imported.root
    by_root = ie.import_bundle(shared.root)  # a bundle pinned remotely is named by its root
    assert by_root.root == shared.root and by_root.report.already_present == 1


def test_a_bundle_with_an_edited_record_is_imported_without_it(
    busybox_cid: str, settings, scratch: Path
) -> None:
    """The import's checks are the cache import's: an edited record is named and left out."""
    from dataclasses import replace

    from ipfs_execute_magic.result_cache import CACHE_DIR

    with Runner(settings) as runner:
        honest = runner.run(RunRequest(busybox_cid, script="echo honest > /output/h"))
        record = honest.record
        edited = replace(record, args=(*record.args, "--edited"))  # the key no longer matches
        edited_cid = runner.store.add_bytes(edited.to_json().encode(), name="record.json")
        runner.results.flush()  # the run's own entries are written in the background
        runner.store.mfs_link(f"{CACHE_DIR}/{record.key}", edited_cid)
        notebook = _notebook_of(scratch / "edited.ipynb", edited_cid)
        shared = share(runner, notebook)  # a record that fails its key goes to records/ only
        # What a forger would send: the edited record as the bundle's cached answer.
        forged = runner.store.compose({f"cache/{record.key}": edited_cid}, base=shared.root)
        runner.store.dag_export(forged, scratch / "forged.car")
        runner.store.mfs_link(f"{CACHE_DIR}/{record.key}", honest.record_cid or "")
    reader = world_traversable_tmpdir("iex-reader-")
    try:
        honest_import = ipfs_execute(reader, "import", str(shared.car))
        assert "0 cached runs (0 already here, 0 rejected)" in honest_import.stdout
        proc = ipfs_execute(reader, "import", str(scratch / "forged.car"))
        assert proc.returncode == 0, proc.stderr
        assert "0 cached runs (0 already here, 1 rejected)" in proc.stdout
        rejected = proc.stderr.strip().splitlines()
        assert len(rejected) == 1 and rejected[0].startswith("ipfs-execute: rejected: ")
        assert "edited after" in rejected[0] and edited_cid in rejected[0]
    finally:
        EmbeddedNode(Settings(home=reader)).stop()
        shutil.rmtree(reader, ignore_errors=True)
