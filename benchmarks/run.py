"""Speed targets, each measured next to its baseline in the same run.

    ./run bench                 # all of it (a few minutes)
    ./run bench --quick         # fewer repetitions

| target                                   | baseline                              | goal     |
|------------------------------------------|---------------------------------------|----------|
| warm run through the Python API          | bare `bwrap ... true` on the same root| +30 ms   |
| warm run through the CLI                 | (reported only)                       |          |
| cold staging of a rootfs (fetch+extract) | `ipfs cat ROOTFS | tar xzf -`         | <= 1.3x  |
| result-cache hit through the Python API  | the same run executed (warm)          | <= 10 ms |

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

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "examples"))

from ipfs_execute_magic.cid import EMPTY_DIRECTORY_CID  # noqa: E402
from ipfs_execute_magic.record import RunRequest  # noqa: E402
from ipfs_execute_magic.runner import RunConditions, Runner  # noqa: E402
from ipfs_execute_magic.settings import SANDBOX_GID, SANDBOX_UID, Settings  # noqa: E402

NO_CACHE = RunConditions(use_cache=False)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
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
        busybox = store.add_path(images.build_busybox(work / "images"))
        python_image = images.build_python(work / "images")
        python_cid = store.add_path(python_image)

        # -- warm: bare bwrap vs the API vs the CLI ---------------------------------------
        request = RunRequest(rootfs=busybox, input=None, args=("true",))
        runner.run(request, NO_CACHE)  # stage rootfs and input
        root = runner.staging_cache.get("rootfs", busybox)
        input_dir = runner.staging_cache.get("input", EMPTY_DIRECTORY_CID)
        assert root is not None and input_dir is not None
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
        overhead = figures["warm_run_api"]["median_ms"] - figures["bare_bwrap_true"]["median_ms"]
        figures["warm_api_overhead_ms"] = overhead

        # -- cold staging: ours vs ipfs cat | tar xzf ---------------------------------------
        kubo_env = dict(
            os.environ,
            IPFS_PATH=str(settings.repo_dir),
            PATH=f"{Path(sys.prefix) / 'bin'}:{os.environ['PATH']}",
        )
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
    if options.json:
        options.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
