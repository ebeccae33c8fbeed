"""The Python API (`import ipfs_execute_magic as ie`) on the session's real node and bwrap."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import world_traversable_tmpdir

import ipfs_execute_magic as ie
from ipfs_execute_magic.errors import UsageError
from ipfs_execute_magic.lineage_graph import LineageNode
from ipfs_execute_magic.settings import Settings
from ipfs_execute_magic.store import AddProgress
from ipfs_execute_magic.verification import NotebookVerdict, Verdict


@pytest.fixture(scope="module")
def api(home: Path, store) -> Iterator[Settings]:
    """ie configured on the session's data directory (its node runs already)."""
    settings = ie.configure(home=home)
    yield settings
    ie.default_runner().close()


def fresh_script(text: str) -> str:
    # A run no earlier test made: the first call of it really runs.
    return f"# {secrets.token_hex(8)}\n{text}"


def test_configure_replaces_the_runner_and_keeps_the_changes(api: Settings, home: Path) -> None:
    before = ie.default_runner()
    settings = ie.configure(home=home, limits=api.limits.with_overrides(timeout=42))
    try:
        runner = ie.default_runner()
        assert runner is not before and runner.settings is settings
        assert settings.home == home and settings.limits.timeout == 42
        assert before._store is None  # the old runner was closed
    finally:
        ie.configure(api)


def test_run_limits_take_the_same_spellings_as_the_cli(api: Settings, busybox_cid: str) -> None:
    result = ie.run(
        busybox_cid,
        None,
        script=fresh_script("true"),
        memory="96M",
        timeout="30s",
        tmp_size=8 * 1024**2,
        pids=64,
    )
    limits = result.record.limits
    assert (limits["memory_bytes"], limits["timeout"], limits["tmp_bytes"], limits["pids"]) == (
        96 * 1024**2,
        30.0,
        8 * 1024**2,
        64,
    )


@pytest.mark.parametrize(
    "limit",
    [
        {"timeout": "nan"},
        {"timeout": float("inf")},
        {"timeout": -1},
        {"memory": "0"},
        {"memory": "lots"},
        {"pids": 0},
        {"tmp_size": "-5M"},
    ],
)
def test_run_refuses_a_bad_limit_before_anything_runs(
    api: Settings, busybox_cid: str, limit: dict
) -> None:
    with pytest.raises(UsageError) as caught:
        ie.run(busybox_cid, None, "true", **limit)
    assert "\n" not in str(caught.value)


def test_a_cache_hit_replays_what_the_run_printed(api: Settings, busybox_cid: str) -> None:
    script = fresh_script("echo to-stdout; echo to-stderr >&2; echo x > /output/x")
    heard: list[bytes] = []
    first = ie.run(busybox_cid, None, script=script, on_stdout=heard.append)
    again_heard: list[bytes] = []
    again = ie.run(
        busybox_cid, None, script=script, on_stdout=again_heard.append, on_stderr=again_heard.append
    )
    assert not first.cache_hit and again.cache_hit
    assert b"".join(heard) == b"to-stdout\n" == again.stdout
    assert again.stderr == b"to-stderr\n"
    assert b"".join(again_heard) == b"to-stdout\nto-stderr\n"
    assert str(again) == str(first) and again.record_cid == first.record_cid


def test_verify_a_result_a_record_and_a_notebook(api: Settings, busybox_cid: str) -> None:
    result = ie.run(busybox_cid, None, script=fresh_script("echo same > /output/same"))
    by_result = ie.verify(result)
    by_record = ie.verify(result.record_cid, runs=2)
    assert isinstance(by_result, Verdict) and by_result.reproducible
    assert isinstance(by_record, Verdict) and by_record.reproducible
    assert [rerun.condition for rerun in by_record.reruns] == [
        "same staging",
        "another staging location",
    ]

    notebook = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {},
        "cells": [
            {
                "cell_type": "code",
                "source": "",
                "metadata": {},
                "execution_count": 1,
                "outputs": [
                    {
                        "output_type": "display_data",
                        "data": {"text/plain": "r"},
                        "metadata": {"ipfs_execute": {"record": result.record_cid}},
                    }
                ],
            }
        ],
    }
    path = world_traversable_tmpdir("iex-api-nb-") / "run.ipynb"
    path.write_text(json.dumps(notebook))
    whole = ie.verify(path)
    assert isinstance(whole, NotebookVerdict) and whole.reproducible
    assert [cell.record_cid for cell in whole] == [result.record_cid]


def test_verify_names_what_is_not_reproducible(api: Settings, busybox_cid: str) -> None:
    result = ie.run(
        busybox_cid, None, script=fresh_script("head -c 8 /dev/urandom > /output/noise")
    )
    verdict = ie.verify(result)
    assert isinstance(verdict, Verdict) and not verdict.reproducible
    assert [diff.path for diff in verdict.reruns[0].diffs] == ["noise"]


def test_add_reports_progress(api: Settings, tmp_path: Path) -> None:
    for index in range(2000):
        (tmp_path / f"f{index:04d}").write_text(f"{index}\n")
    seen: list[AddProgress] = []
    data = ie.add(tmp_path, on_progress=seen.append)
    assert str(data) == ie.add(tmp_path)
    assert seen and seen[-1].finished
    size = sum(len(f"{index}\n") for index in range(2000))
    assert (seen[-1].files, seen[-1].files_total, seen[-1].bytes) == (2000, 2000, size)


def test_lineage_goes_back_through_runs_to_the_data(
    api: Settings, busybox_cid: str, tmp_path: Path
) -> None:
    (tmp_path / "words.txt").write_text(f"b\na\n{secrets.token_hex(4)}\n")
    data = ie.add(tmp_path)
    sorted_words = ie.run(busybox_cid, data, script="sort /input/words.txt > /output/sorted")
    head = ie.run(busybox_cid, sorted_words, script="head -n 1 /input/sorted > /output/head")
    node = ie.lineage(head)
    assert isinstance(node, LineageNode) and node.record == head.record
    parents = {label: parent for label, parent in node.parents}
    assert parents["input"].record == sorted_words.record
    grand = {label: parent for label, parent in parents["input"].parents}
    assert grand["input"].cid == str(data) and grand["input"].record is None


def test_the_api_functions_survive_importing_every_module() -> None:
    """A submodule named like an API function would replace it on import (`ie.verify` became
    a module once the magic imported the verifier)."""
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(ie.__path__, "ipfs_execute_magic."):
        importlib.import_module(module.name)
    for name in ie.__all__:
        if name == "images":  # a namespace of functions on purpose: ie.images.busybox()
            assert callable(ie.images.busybox), "ie.images lost its functions"
            continue
        assert type(getattr(ie, name)).__name__ != "module", f"ie.{name} is a module"


def test_an_input_holding_the_scripts_own_name_is_refused_for_a_cell(
    api: Settings, busybox_cid: str, tmp_path: Path
) -> None:
    """The cell's script goes to /input/.ipfs-execute/script: an input that has that name
    already is refused in one line, before anything runs; without a script it is just data."""
    (tmp_path / ".ipfs-execute").write_bytes(b"mine\n")
    (tmp_path / "data.txt").write_bytes(b"1\n")
    taken = ie.add(tmp_path)
    with pytest.raises(UsageError, match=rf"input {taken} already has a \.ipfs-execute/ entry"):
        ie.run(busybox_cid, taken, script="true")
    assert ie.run(busybox_cid, taken, "cat", "/input/.ipfs-execute").stdout == b"mine\n"
