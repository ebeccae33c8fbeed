"""Every bad input gets one line that names it and says what to do: limits that are not
numbers, content of the wrong kind, an unusable data directory, a run the memory limit ended,
and the lineage of content that many runs produce.

Real Kubo, real bwrap, the real console script.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import BIN, cli_env, ipfs_execute, world_traversable_tmpdir

from ipfs_execute_magic.cid import EMPTY_DIRECTORY_CID, EMPTY_FILE_CID, cid_codec
from ipfs_execute_magic.errors import EXIT_TOOL_FAILURE, EXIT_USAGE
from ipfs_execute_magic.record import RunRecord
from ipfs_execute_magic.settings import Limits

HOG = "x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo survived"


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def staged(home: Path, cid: str) -> list[Path]:
    """Anything the staging cache made for `cid`, ready or in progress."""
    cache = home / "cache"
    return [p for p in cache.glob(f"*/{cid}*")] + [p for p in cache.glob(f"tmp/*{cid}*")]


# -- limits are refused when the options are read ------------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [
        ("--timeout", "nan"),
        ("--timeout", "inf"),
        ("--timeout", "-5"),
        ("--memory", "inf"),
        ("--memory", "nanM"),
        ("--memory", "-1G"),
        ("--tmp-size", "infM"),
        ("--pids", "-3"),
        ("--fetch-timeout", "nan"),
    ],
)
def test_a_limit_that_is_not_a_positive_finite_number_is_refused_before_anything_runs(
    option: str, value: str
) -> None:
    home = world_traversable_tmpdir("iex-bad-limit-") / "never-created"
    # OPTION=VALUE: argparse reads a separate "-5" as an option of its own.
    result = ipfs_execute(home, f"{option}={value}", EMPTY_DIRECTORY_CID, EMPTY_DIRECTORY_CID)
    assert result.returncode == EXIT_USAGE
    # argparse's usage line, then one line that names the option and the value.
    error = result.stderr.strip().splitlines()[-1]
    assert option in error and repr(value) in error, result.stderr
    assert not home.exists()  # no node started, nothing staged


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_a_bad_timeout_in_the_environment_is_one_line_before_anything_runs(value: str) -> None:
    home = world_traversable_tmpdir("iex-bad-env-") / "never-created"
    env = cli_env(home, IPFS_EXECUTE_TIMEOUT=value)
    result = ipfs_execute(home, EMPTY_DIRECTORY_CID, EMPTY_DIRECTORY_CID, "true", env=env)
    assert result.returncode == EXIT_USAGE
    assert one_line(result.stderr).startswith("ipfs-execute: IPFS_EXECUTE_TIMEOUT: ")
    assert not home.exists()


# -- content of the wrong kind ---------------------------------------------------------------


def _kubo(kubo_env: dict[str, str], *args: str, data: bytes) -> str:
    return (
        subprocess.run(
            [str(BIN / "ipfs"), *args], input=data, env=kubo_env, capture_output=True, check=True
        )
        .stdout.decode()
        .strip()
    )


def test_cid_codec_reads_the_codec_from_every_multibase(kubo_env: dict[str, str]) -> None:
    cbor = _kubo(kubo_env, "dag", "put", "--store-codec", "dag-cbor", data=b'{"a": 1}')
    for base in ("base32", "base58btc", "base36", "base16"):
        spelled = _kubo(kubo_env, "cid", "format", "-b", base, cbor, data=b"")
        assert cid_codec(spelled) == "dag-cbor", spelled
    assert cid_codec(EMPTY_DIRECTORY_CID) == "dag-pb"
    assert cid_codec(EMPTY_FILE_CID) == "raw"
    assert cid_codec("QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn") == "dag-pb"
    assert cid_codec("not-a-cid") is None


def test_a_cid_of_another_codec_is_refused_before_anything_is_staged(
    home: Path, busybox_cid: str, empty_cid: str, kubo_env: dict[str, str]
) -> None:
    cbor = _kubo(kubo_env, "dag", "put", "--store-codec", "dag-cbor", data=b'{"a": 1}')
    dag_json = _kubo(kubo_env, "dag", "put", "--store-codec", "dag-json", data=b'{"b": 2}')
    raw_block = _kubo(kubo_env, "block", "put", data=b"just some bytes\n")
    for cid, codec in ((cbor, "dag-cbor"), (dag_json, "dag-json")):
        as_rootfs = ipfs_execute(home, cid, empty_cid, "true")
        assert as_rootfs.returncode == EXIT_USAGE
        line = one_line(as_rootfs.stderr)
        assert f"rootfs {cid} is a {codec} node" in line and "ipfs dag put" in line
        as_input = ipfs_execute(home, busybox_cid, cid, "true")
        assert as_input.returncode == EXIT_USAGE
        assert f"input {cid} is a {codec} node, not a directory" in one_line(as_input.stderr)
        assert staged(home, cid) == []
    as_input = ipfs_execute(home, busybox_cid, raw_block, "true")
    assert as_input.returncode == EXIT_USAGE
    line = one_line(as_input.stderr)
    assert f"input {raw_block} is a raw block, i.e. a file, not a directory" in line
    assert f"ipfs-mkdir data.bin {raw_block}" in line
    assert staged(home, raw_block) == []


def test_a_script_on_an_input_that_is_not_a_directory_is_refused_the_same_way(
    home: Path, busybox_cid: str, kubo_env: dict[str, str], store
) -> None:
    from ipfs_execute_magic.errors import UsageError
    from ipfs_execute_magic.record import RunRequest
    from ipfs_execute_magic.runner import Runner
    from ipfs_execute_magic.settings import Settings

    raw_block = _kubo(kubo_env, "block", "put", data=b"bytes, not a directory\n")
    with Runner(Settings(home=home)) as runner, pytest.raises(UsageError) as caught:
        runner.run(RunRequest(busybox_cid, raw_block, script="echo hi"))
    assert f"input {raw_block} is a raw block" in str(caught.value)
    # A file of several blocks is dag-pb, like a directory: the node tells them apart.
    big_file = store.add_bytes(os.urandom(3 * 1024 * 1024))
    assert cid_codec(big_file) == "dag-pb"
    with Runner(Settings(home=home)) as runner, pytest.raises(UsageError) as caught:
        runner.run(RunRequest(busybox_cid, big_file, script="echo hi"))
    assert str(caught.value) == (
        f"input {big_file} is a file, not a directory: put it in one, "
        f"e.g. `ipfs-mkdir data.bin {big_file}`"
    )


def test_a_dag_pb_node_that_is_not_unixfs_is_named_as_such(
    home: Path, busybox_cid: str, empty_cid: str, kubo_env: dict[str, str]
) -> None:
    not_unixfs = _kubo(
        kubo_env,
        "dag",
        "put",
        "--store-codec",
        "dag-pb",
        "--input-codec",
        "dag-json",
        data=b'{"Data": {"/": {"bytes": "aGVsbG8"}}, "Links": []}',
    )
    for argv in ((not_unixfs, empty_cid), (busybox_cid, not_unixfs)):
        result = ipfs_execute(home, *argv, "true")
        assert result.returncode == EXIT_USAGE
        line = one_line(result.stderr)
        assert f"{not_unixfs} is not a UnixFS file or directory" in line
        assert "ipfs-execute add" in line
    assert staged(home, not_unixfs) == []


def test_an_empty_rootfs_file_is_refused_before_anything_is_staged(
    home: Path, empty_cid: str, store
) -> None:
    empty_file = store.add_bytes(b"")
    assert empty_file == EMPTY_FILE_CID
    result = ipfs_execute(home, empty_file, empty_cid, "true")
    assert result.returncode == EXIT_TOOL_FAILURE
    line = one_line(result.stderr)
    assert f"rootfs {empty_file} is an empty file (0 bytes), not an archive" in line
    assert "retry" not in line  # it is not a download problem
    assert staged(home, empty_file) == []


def test_a_truncated_rootfs_archive_is_blamed_on_the_archive_not_the_download(
    home: Path, busybox_tarball: Path, empty_cid: str, store
) -> None:
    whole = busybox_tarball.read_bytes()
    cut_gzip = store.add_bytes(whole[: len(whole) // 2])
    cut_tar = store.add_bytes(gzip.decompress(whole)[:700_000])
    for cid, size in ((cut_gzip, len(whole) // 2), (cut_tar, 700_000)):
        result = ipfs_execute(home, cid, empty_cid, "true")
        assert result.returncode == EXIT_TOOL_FAILURE
        line = one_line(result.stderr)
        assert f"rootfs {cid} is a truncated archive: all {size} bytes of it arrived" in line
        assert "re-create it and add it again" in line and "retry" not in line
        assert staged(home, cid) == []


# -- the data directory ------------------------------------------------------------------------


def test_a_home_under_a_file_is_one_line(busybox_cid: str, empty_cid: str) -> None:
    a_file = world_traversable_tmpdir("iex-home-file-") / "a-file"
    a_file.write_text("not a directory\n")
    for home in (a_file, a_file / "sub"):
        for argv in ((busybox_cid, empty_cid, "true"), ("add", str(a_file)), ("node", "status")):
            result = ipfs_execute(home, *argv)
            assert result.returncode == EXIT_USAGE, result.stderr
            line = one_line(result.stderr)
            assert f"cannot use {home} as the data directory: {a_file} is a file" in line
            assert "--home" in line


@pytest.mark.skipif(os.geteuid() != 0, reason="starts the tool as another user")
def test_a_read_only_home_is_one_line_for_an_ordinary_user(
    busybox_cid: str, empty_cid: str
) -> None:
    read_only = world_traversable_tmpdir("iex-home-ro-")
    read_only.chmod(0o555)
    for home in (read_only, read_only / "sub"):
        completed = subprocess.run(
            [
                "setpriv",
                "--reuid=1000",
                "--regid=1000",
                "--clear-groups",
                str(BIN / "ipfs-execute"),
                "--home",
                str(home),
                busybox_cid,
                empty_cid,
                "true",
            ],
            env=cli_env(home, HOME=str(read_only)),
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert completed.returncode == EXIT_USAGE, completed.stderr
        line = one_line(completed.stderr)
        assert f"{read_only} is not writable by uid 1000" in line, line
    assert list(read_only.iterdir()) == []


# -- the memory limit --------------------------------------------------------------------------


def test_a_run_killed_by_the_memory_limit_says_so_and_records_it(
    home: Path, busybox_cid: str, empty_cid: str, store
) -> None:
    result = ipfs_execute(
        home, "--memory", "64M", "--tmp-size", "1M", "--json", busybox_cid, empty_cid, "sh", "-c",
        HOG,
    )  # fmt: skip
    record = json.loads(result.stdout)
    if "cgroup" not in record["limits_enforced"].get("memory", ""):
        pytest.skip("no memory cgroup here")
    assert result.returncode == 137
    assert "survived" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("ipfs-execute: killed: out of memory (limit 64 MiB), exit status 137")
    assert "--memory" in line and record["output"] in line
    assert record["killed_by"] == "memory"
    stored = RunRecord.from_json(store.cat(record["record_cid"]))
    assert stored.killed_by == "memory"
    assert stored.killed_text() == "killed: out of memory (limit 64 MiB)"

    # A payload killed by SIGKILL with memory to spare is not blamed on the limit.
    result = ipfs_execute(home, "--memory", "64M", "--json", busybox_cid, empty_cid, "sh", "-c",
                          "kill -9 $$")  # fmt: skip
    assert result.returncode == 137
    assert json.loads(result.stdout)["killed_by"] is None
    assert "out of memory" not in result.stderr


def test_a_timed_out_run_records_the_timeout(home: Path, busybox_cid: str, empty_cid: str) -> None:
    result = ipfs_execute(
        home, "--timeout", "1", "--json", busybox_cid, empty_cid, "sleep", "30", timeout=60
    )
    record = json.loads(result.stdout)
    assert record["timed_out"] and record["killed_by"] == "timeout"
    assert (
        RunRecord.from_json(json.dumps(record)).killed_text() == "killed: ran past the 1 s timeout"
    )


def test_records_without_the_field_still_load() -> None:
    record = RunRecord(
        rootfs=EMPTY_DIRECTORY_CID,
        input=EMPTY_DIRECTORY_CID,
        output=EMPTY_DIRECTORY_CID,
        args=("true",),
        exit_status=137,
        timed_out=False,
        started_at="2026-12-01T00:00:00.000+00:00",
        durations={},
        limits={"memory_bytes": Limits().memory_bytes},
        limits_enforced={},
        versions={},
        staged_from_cache={},
        killed_by="memory",
    )
    assert record.killed_text() == "killed: out of memory (limit 2 GiB)"
    older = json.loads(record.to_json())
    del older["killed_by"]
    assert RunRecord.from_json(json.dumps(older)).killed_by is None
    assert RunRecord.from_json(record.to_json()) == record


# -- lineage -----------------------------------------------------------------------------------


def test_lineage_of_the_empty_directory_credits_no_run(
    home: Path, busybox_cid: str, empty_cid: str
) -> None:
    # A run whose output is the empty directory, so the index has one to (wrongly) credit.
    # Not plain `true`: other tests rely on that run not being cached.
    produced_empty = ipfs_execute(home, busybox_cid, empty_cid, "sh", "-c", ": lineage")
    assert produced_empty.stdout.strip() == EMPTY_DIRECTORY_CID
    result = ipfs_execute(home, "lineage", EMPTY_DIRECTORY_CID)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"/ipfs/{EMPTY_DIRECTORY_CID}  (the empty directory: produced by many runs, so no run "
        "is credited)"
    )
    # A run on the empty input: its input is not traced to that unrelated run.
    wrote = ipfs_execute(home, busybox_cid, empty_cid, "sh", "-c", "echo one > /output/one")
    tree = ipfs_execute(home, "lineage", wrote.stdout.strip()).stdout.splitlines()
    assert sum("<- run" in line for line in tree) == 1, tree
    assert any(
        line.strip().startswith(f"input: /ipfs/{EMPTY_DIRECTORY_CID}")
        and "produced by many runs" in line
        for line in tree
    ), tree
