"""Speed targets, each measured next to its baseline in the same run.

    ./run bench                 # all of it (a few minutes)
    ./run bench --quick         # fewer repetitions

| target                                   | baseline                              | goal     |
|------------------------------------------|---------------------------------------|----------|
| warm run through the Python API          | bare `bwrap ... true` on the same root| +30 ms   |
| warm run through the CLI                 | (reported only)                       |          |
| cold staging of a rootfs (fetch+extract) | `ipfs cat ROOTFS | tar xzf -`         | <= 1.3x  |
| result-cache hit through the Python API  | the same run executed (warm)          | <= 10 ms |
| adding an /output of many small files    | `ipfs add -r` on the same daemon      | >= 0.8x  |

Warm means rootfs and input already staged. Runs use a private data directory and the
embedded node; nothing here touches the user's own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "examples"))

from ipfs_execute_magic.cid import EMPTY_DIRECTORY_CID  # noqa: E402
from ipfs_execute_magic.record import RunRequest  # noqa: E402
from ipfs_execute_magic.runner import RunConditions, Runner  # noqa: E402
from ipfs_execute_magic.settings import SANDBOX_GID, SANDBOX_UID, Settings  # noqa: E402

NO_CACHE = RunConditions(use_cache=False)
FILES_PER_DIRECTORY = 1000

# Our add, in a process of its own so that its peak RSS is the tool's, not the benchmark's.
ADD_PROBE = """
import json, resource, sys, time
from pathlib import Path
from ipfs_execute_magic.settings import Settings
from ipfs_execute_magic.store import Store
store = Store.connect(Settings(home=Path(sys.argv[1])))
start = time.perf_counter()
cid = store.add_path(Path(sys.argv[2]), pin=True)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"cid": cid, "seconds": seconds, "peak_rss_mib": peak / 1024}))
"""


def timed(action: Callable[[], object], repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[int(len(ordered) * 0.9) - 1 if len(ordered) > 1 else 0] * 1000,
        "min_ms": ordered[0] * 1000,
        "n": len(ordered),
    }


def bare_bwrap_argv(root: Path, input_dir: Path, output_dir: Path) -> list[str]:
    """The namespaces and main mounts of a run, without anything of ours around it (no
    cgroups, rlimits, time namespace or synthetic /proc entries: that is the overhead)."""
    argv = [
        "bwrap",
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--ro-bind",
        str(root),
        "/",
        "--ro-bind",
        str(input_dir),
        "/input",
        "--bind",
        str(output_dir),
        "/output",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "/sbin/init",
        "true",
    ]
    if os.geteuid() == 0:  # a run drops to an unprivileged uid; so does the baseline
        argv = [
            "setpriv",
            f"--reuid={SANDBOX_UID}",
            f"--regid={SANDBOX_GID}",
            "--clear-groups",
            *argv,
        ]
    return argv


def make_output_like_tree(root: Path, files: int) -> int:
    """A run's /output of many small files: 1,000 a directory, a few hundred distinct bytes
    each. Returns the total size."""
    total = 0
    for number in range(files):
        folder = root / f"part-{number // FILES_PER_DIRECTORY:04d}"
        if number % FILES_PER_DIRECTORY == 0:
            folder.mkdir(parents=True)
        data = b'{"record": %d, "value": "%064x"}\n' % (number, number * 2654435761) * 3
        (folder / f"record-{number % FILES_PER_DIRECTORY:04d}.json").write_bytes(data)
        total += len(data)
    return total


def bench_add(
    settings: Settings, kubo_env: dict[str, str], tree: Path, repeat: int
) -> dict[str, Any]:
    """Our add (`Store.add_path`) against `ipfs add -r` with the same import flags, on the same
    daemon, alternating which goes first; one unmeasured add first so that both find every
    block already stored."""
    cli = [
        "ipfs",
        "add",
        "-r",
        "--hidden",
        "-Q",
        "--pin=true",
        "--cid-version=1",
        "--raw-leaves",
        "--chunker=size-1048576",
        str(tree),
    ]
    probe = [sys.executable, "-c", ADD_PROBE, str(settings.home), str(tree)]

    def ours() -> dict[str, Any]:
        done = subprocess.run(probe, check=True, capture_output=True, text=True)
        return dict(json.loads(done.stdout))

    def theirs() -> tuple[str, float]:
        start = time.perf_counter()
        done = subprocess.run(cli, check=True, capture_output=True, text=True, env=kubo_env)
        return done.stdout.strip(), time.perf_counter() - start

    warm = ours()
    our_seconds, cli_seconds, peaks = [], [], [warm["peak_rss_mib"]]
    for attempt in range(repeat):
        for side in ("cli", "ours") if attempt % 2 == 0 else ("ours", "cli"):
            if side == "cli":
                cid, seconds = theirs()
                assert cid == warm["cid"], f"ipfs add -r gave {cid}, ours {warm['cid']}"
                cli_seconds.append(seconds)
            else:
                figures = ours()
                our_seconds.append(figures["seconds"])
                peaks.append(figures["peak_rss_mib"])
    files = sum(1 for _, _, names in os.walk(tree) for _ in names)
    ours_rate = files / statistics.median(our_seconds)
    cli_rate = files / statistics.median(cli_seconds)
    return {
        "files": files,
        "cid": warm["cid"],
        "ours_s": statistics.median(our_seconds),
        "cli_s": statistics.median(cli_seconds),
        "ours_files_per_s": ours_rate,
        "cli_files_per_s": cli_rate,
        "speed_ratio": ours_rate / cli_rate,
        "peak_rss_mib": max(peaks),
        "n": repeat,
    }


def print_add(figures: dict[str, Any]) -> None:
    files = f"{figures['files']:,} files"
    print(
        f"{'add ' + files + ': ipfs add -r (baseline)':<44} {figures['cli_files_per_s']:9.0f} "
        f"files/s  ({figures['cli_s']:.2f} s median, n={figures['n']})"
    )
    print(
        f"{'add ' + files + ': ours (Store.add_path)':<44} {figures['ours_files_per_s']:9.0f} "
        f"files/s  ({figures['ours_s']:.2f} s median; peak RSS {figures['peak_rss_mib']:.0f} MiB)"
    )
    ratio = figures["speed_ratio"]
    verdict = "ok" if ratio >= 0.8 else "MISSED"
    print(
        f"{'add speed ratio (ours / ipfs add -r)':<44} {ratio:9.2f} x          (target >= 0.8x: {verdict})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--big", action="store_true", help="add 200,000 files instead of 20,000 (minutes)"
    )
    parser.add_argument("--add-only", action="store_true", help="only the many-files add")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    options = parser.parse_args()
    repeat = 10 if options.quick else 40
    cold_repeat = 3 if options.quick else 5

    import images

    work = Path(tempfile.mkdtemp(prefix="iex-bench-", dir="/tmp"))
    work.chmod(0o755)
    settings = Settings(home=work / "home")
    runner = Runner(settings)
    figures: dict[str, object] = {}
    try:
        store = runner.store
        kubo_env = dict(
            os.environ,
            IPFS_PATH=str(settings.repo_dir),
            PATH=f"{Path(sys.prefix) / 'bin'}:{os.environ['PATH']}",
        )

        # -- many small files: our add vs ipfs add -r --------------------------------------
        tree = work / "many-files"
        make_output_like_tree(tree, 200_000 if options.big else 20_000)
        figures["add_many_files"] = bench_add(
            settings, kubo_env, tree, repeat=1 if options.big else (2 if options.quick else 3)
        )

        if not options.add_only:
            busybox = store.add_path(images.build_busybox(work / "images"))
            python_image = images.build_python(work / "images")
            python_cid = store.add_path(python_image)

            # -- warm: bare bwrap vs the API vs the CLI ---------------------------------------
            request = RunRequest(rootfs=busybox, input=None, args=("true",))
            runner.run(request, NO_CACHE)  # stage rootfs and input
            root = runner.staging_cache.get("rootfs", busybox)
            input_dir = runner.staging_cache.get("input", EMPTY_DIRECTORY_CID)
            assert root is not None and input_dir is not None
            # The data directory is private (0700): the baseline, which has no binds made for
            # the sandbox uid, gets hard-linked copies of the same trees where that uid can go.
            for name, staged in (("bare-root", root), ("bare-input", input_dir)):
                subprocess.run(["cp", "-al", str(staged), str(work / name)], check=True)
            root, input_dir = work / "bare-root", work / "bare-input"
            output_dir = work / "bare-output"
            output_dir.mkdir()
            output_dir.chmod(0o777)
            bare = bare_bwrap_argv(root, input_dir, output_dir)
            subprocess.run(bare, check=True)
            bare_samples = timed(lambda: subprocess.run(bare, check=True), repeat)
            api_samples = timed(lambda: runner.run(request, NO_CACHE), repeat)
            # A hit: the same request answered from the result cache (a fresh Runner, so the
            # in-process memo is cold for the first lookup and the index in the node is used).
            hit_runner = Runner(settings, store=store)
            hit_samples = timed(lambda: hit_runner.run(request), repeat)
            assert hit_runner.run(request).cache_hit
            cli = [
                str(Path(sys.prefix) / "bin" / "ipfs-execute"),
                "--no-cache",
                busybox,
                EMPTY_DIRECTORY_CID,
                "true",
            ]
            env = {k: v for k, v in os.environ.items() if not k.startswith("IPFS_EXECUTE_")}
            env["IPFS_EXECUTE_HOME"] = str(settings.home)
            cli_samples = timed(
                lambda: subprocess.run(
                    cli, check=True, env=env, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL
                ),
                max(5, repeat // 4),
            )
            figures["bare_bwrap_true"] = summary(bare_samples)
            figures["warm_run_api"] = summary(api_samples)
            figures["warm_run_cli"] = summary(cli_samples)
            figures["cache_hit_api"] = summary(hit_samples)
            figures["cache_hit_first_lookup_ms"] = hit_samples[0] * 1000
            overhead = (
                figures["warm_run_api"]["median_ms"] - figures["bare_bwrap_true"]["median_ms"]
            )
            figures["warm_api_overhead_ms"] = overhead

            # -- cold staging: ours vs ipfs cat | tar xzf ---------------------------------------
            pipeline_samples, ours_samples = [], []
            for attempt in range(cold_repeat):
                target = work / f"pipeline-{attempt}"
                target.mkdir()
                start = time.perf_counter()
                subprocess.run(
                    f"ipfs cat {python_cid} | tar xzf - -C {target}",
                    shell=True,
                    check=True,
                    env=kubo_env,
                )
                pipeline_samples.append(time.perf_counter() - start)

                cold = Runner(settings.with_changes(home=work / f"cold-{attempt}"), store=store)
                from ipfs_execute_magic.staging import Stager

                start = time.perf_counter()
                Stager(store, cold.staging_cache).stage_rootfs(python_cid)
                ours_samples.append(time.perf_counter() - start)
            figures["cold_pipeline_ipfs_cat_tar"] = summary(pipeline_samples)
            figures["cold_staging_ours"] = summary(ours_samples)
            ratio = (
                figures["cold_staging_ours"]["median_ms"]
                / figures["cold_pipeline_ipfs_cat_tar"]["median_ms"]
            )
            figures["cold_ratio"] = ratio
            figures["rootfs"] = {
                "image": "python",
                "cid": python_cid,
                "bytes": python_image.stat().st_size,
            }
    finally:
        runner.close()
        from ipfs_execute_magic.node import EmbeddedNode

        EmbeddedNode(settings).stop()
        subprocess.run(["chmod", "-R", "u+rwX", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)

    if options.json:
        options.json.write_text(json.dumps(figures, indent=2))
    print_add(figures["add_many_files"])  # type: ignore[arg-type]
    if not options.add_only:
        print_runs(figures)


def print_runs(figures: dict[str, object]) -> None:
    overhead = figures["warm_api_overhead_ms"]
    ratio = figures["cold_ratio"]
    assert isinstance(overhead, float) and isinstance(ratio, float)

    def row(name: str, key: str) -> str:
        value = figures[key]
        assert isinstance(value, dict)
        return f"{name:<44} {value['median_ms']:9.1f} ms median  ({value['min_ms']:.1f} min, n={value['n']})"

    print(row("bare bwrap true (baseline)", "bare_bwrap_true"))
    print(row("warm run, Python API", "warm_run_api"))
    print(row("warm run, CLI (process start included)", "warm_run_cli"))
    verdict = "ok" if overhead <= 30 else "MISSED"
    print(
        f"{'warm API overhead over bare bwrap':<44} {overhead:9.1f} ms         (target <= 30 ms: {verdict})"
    )
    hit = figures["cache_hit_api"]["median_ms"]  # type: ignore[index]
    first = figures["cache_hit_first_lookup_ms"]
    verdict = "ok" if hit <= 10 and first <= 10 else "MISSED"
    print(
        f"{'cache hit, Python API (first lookup)':<44} {hit:9.2f} ms median  ({first:.2f} ms first; target <= 10 ms: {verdict})"
    )
    print(row("cold: ipfs cat | tar xzf (baseline)", "cold_pipeline_ipfs_cat_tar"))
    print(row("cold: our staging (fetch + safe extract)", "cold_staging_ours"))
    verdict = "ok" if ratio <= 1.3 else "MISSED"
    print(f"{'cold staging ratio':<44} {ratio:9.2f} x          (target <= 1.3x: {verdict})")


if __name__ == "__main__":
    main()
