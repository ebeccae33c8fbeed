"""The demo: build the busybox image, run a computation on the embedded node, chain a second.

Run through `./run demo`. Every step is an ordinary command a user could type.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.prefix) / "bin"


def step(title: str, argv: list[str], *, stdin: str | None = None) -> str:
    print(f"\n$ {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    result = subprocess.run(argv, input=stdin, text=True, stdout=subprocess.PIPE, env=env,
                            cwd=PROJECT)
    out = result.stdout.strip()
    print(out)
    if result.returncode != 0:
        sys.exit(f"demo: {title} failed with exit status {result.returncode}")
    return out


def main() -> None:
    busybox = step("building the busybox image", [str(PROJECT / "examples" / "build"), "busybox"])
    words = PROJECT / "examples" / "data" / "words"
    data = step("adding the input data", [str(BIN / "ipfs-execute"), "add", str(words)])
    counts = step("counting words in the sandbox", [
        str(BIN / "ipfs-execute"), busybox, data, "sh", "-c",
        "sort /input/words.txt | uniq -c | sort -rn > /output/counts.txt"])
    top = step("chaining: the top three words, computed from the first output", [
        str(BIN / "ipfs-execute"), busybox, counts, "sh", "-c",
        "head -n 3 /input/counts.txt > /output/top.txt"])
    repo = step("the embedded node", [str(BIN / "ipfs-execute"), "node", "status"])
    ipfs_path = next(line.split(":", 1)[1].strip() for line in repo.splitlines()
                     if line.startswith("repo:"))
    print(f"\n$ IPFS_PATH={ipfs_path} ipfs cat {top}/top.txt")
    env = dict(os.environ, IPFS_PATH=ipfs_path, PATH=f"{BIN}:{os.environ['PATH']}")
    print(subprocess.run(["ipfs", "cat", f"{top}/top.txt"], env=env, check=True, text=True,
                         stdout=subprocess.PIPE).stdout, end="")
    print(f"\ndemo: done. rootfs {busybox}, input {data}, counts {counts}, top {top}")


if __name__ == "__main__":
    main()
