"""The embedded Kubo node: a private daemon the tool starts on first use and then reuses.

The repo lives in the data directory (``Settings.repo_dir``). It is initialised with the
``test,unixfs-v1-2025`` profiles: API, gateway and swarm on random loopback ports, no bootstrap,
no mDNS, and the import settings that make CIDs reproducible. It runs offline unless asked.

Several processes may want the node at once: an exclusive file lock around "is it running? if
not, start it" makes exactly one of them start the daemon and the others wait and reuse it.

`store` is the one module that talks to Kubo's RPC API for content. This module manages the
daemon's life only (init, start, readiness, stop); its one RPC call, the readiness probe
(`POST /api/v0/id`), goes through urllib because it must work before any Store exists (a Store
checks the daemon's version on connect) and because `node status` should not pay for importing
the HTTP client.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import NodeError
from .settings import KUBO_VERSION, Settings

INIT_PROFILES = "test,unixfs-v1-2025"
START_TIMEOUT_S = 60.0


def api_url(multiaddr: str) -> str:
    """Turn a Kubo API multiaddr (`/ip4/127.0.0.1/tcp/5001`) into an http base URL."""
    parts = multiaddr.strip().split("/")
    # ['', 'ip4', host, 'tcp', port, ...]
    if len(parts) >= 5 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6") and parts[3] == "tcp":
        host = f"[{parts[2]}]" if parts[1] == "ip6" else parts[2]
        return f"http://{host}:{parts[4]}"
    if multiaddr.startswith(("http://", "https://")):
        return multiaddr.rstrip("/")
    raise NodeError(
        f"cannot use API address {multiaddr!r}: expected a multiaddr like /ip4/127.0.0.1/tcp/5001"
    )


def daemon_answers(multiaddr: str, timeout: float = 2.0) -> bool:
    """True when a Kubo daemon answers POST /api/v0/id at this address."""
    try:
        url = api_url(multiaddr) + "/api/v0/id"
    except NodeError:
        return False
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, method="POST"), timeout=timeout
        ) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def find_kubo_binary(settings: Settings) -> str:
    """The `ipfs` binary: configured, next to this Python (the venv), on PATH, or the build cache."""
    candidates: list[str | None] = [settings.kubo_binary]
    candidates.append(str(Path(sys.prefix) / "bin" / "ipfs"))  # the set-up links it into the venv
    candidates.append(shutil.which("ipfs"))
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    candidates.append(str(Path(cache_home) / "ipfs-execute" / "kubo" / KUBO_VERSION / "ipfs"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    raise NodeError(
        "no Kubo `ipfs` binary found for the embedded node: run `./run setup` from "
        "the project, set IPFS_EXECUTE_KUBO to an ipfs binary, or use your own daemon "
        "with --api / IPFS_EXECUTE_API"
    )


@dataclass(frozen=True)
class NodeStatus:
    repo: Path
    api: str | None  # multiaddr, when running
    pid: int | None
    running: bool

    def describe(self) -> str:
        lines = [f"repo: {self.repo}"]
        if self.running:
            lines.append(f"api:  {self.api}")
            lines.append(f"pid:  {self.pid}")
            lines.append(
                f"use the Kubo CLI with it: IPFS_PATH={self.repo} ipfs ...  "
                f"(or ipfs --api={self.api} ...)"
            )
        else:
            lines.append("state: stopped (it starts on first use)")
        return "\n".join(lines)


class EmbeddedNode:
    """A private Kubo daemon in ``settings.repo_dir``, shared by every process that uses it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repo = settings.repo_dir
        self._lock_path = settings.home / "node.lock"
        self._pid_path = settings.home / "node.pid"

    # -- queries -----------------------------------------------------------------------------

    def _api_from_file(self) -> str | None:
        try:
            return (self.repo / "api").read_text().strip() or None
        except OSError:
            return None

    def _pid(self) -> int | None:
        """The daemon's pid, only if that process really is a Kubo daemon (a pid file can
        outlive a reboot and name an unrelated process by then)."""
        try:
            pid = int(self._pid_path.read_text().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except (OSError, ValueError):
            return None
        if len(argv) < 2 or not argv[0].endswith(b"ipfs") or argv[1] != b"daemon":
            return None
        return pid

    def running_api(self) -> str | None:
        """The API multiaddr of the running daemon, or None. A stale api file is not enough."""
        api = self._api_from_file()
        if api and daemon_answers(api):
            return api
        return None

    def status(self) -> NodeStatus:
        api = self.running_api()
        return NodeStatus(
            repo=self.repo, api=api, pid=self._pid() if api else None, running=api is not None
        )

    # -- lifecycle ---------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.settings.home.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def ensure_running(self) -> str:
        """Start the daemon unless it already runs; return its API multiaddr."""
        api = self.running_api()
        if api:
            return api
        with self._locked():
            api = self.running_api()  # another process may have started it while we waited
            if api:
                return api
            return self._start()

    def _kubo_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["IPFS_PATH"] = str(self.repo)
        # An explicit API address in the caller's environment must not redirect our own node.
        env.pop("IPFS_API", None)
        return env

    def _init_repo(self, binary: str) -> None:
        if (self.repo / "config").exists():
            return
        self.repo.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [binary, "init", f"--profile={INIT_PROFILES}", "--empty-repo"],
            env=self._kubo_env(),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise NodeError(
                f"`ipfs init` failed for the embedded node in {self.repo}: "
                f"{(result.stderr.strip().splitlines() or [str(result.returncode)])[-1]}"
            )

    def _start(self) -> str:
        binary = find_kubo_binary(self.settings)
        self._init_repo(binary)
        stale_api = self.repo / "api"
        stale_api.unlink(missing_ok=True)  # readiness is "api file written", so clear old ones
        args = [binary, "daemon"]
        if not self.settings.online:
            args.append("--offline")
        log_path = self.settings.home / "node.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                args,
                env=self._kubo_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        self._pid_path.write_text(f"{process.pid}\n")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise NodeError(
                    f"the embedded Kubo daemon exited with status {process.returncode}"
                    f" while starting; see {log_path}"
                )
            api = self._api_from_file()
            if api and daemon_answers(api):
                return api
            time.sleep(0.05)
        process.kill()
        process.wait()
        self._pid_path.unlink(missing_ok=True)
        raise NodeError(
            f"the embedded Kubo daemon did not become ready within "
            f"{START_TIMEOUT_S:.0f} s; see {log_path}"
        )

    def stop(self, timeout: float = 20.0) -> bool:
        """Stop the daemon. Returns False when it was not running."""
        with self._locked():
            api = self.running_api()
            pid = self._pid()
            if api is None and pid is None:
                return False
            if api:
                try:
                    urllib.request.urlopen(
                        urllib.request.Request(api_url(api) + "/api/v0/shutdown", method="POST"),
                        timeout=5,
                    ).close()
                except (urllib.error.URLError, OSError):
                    pass
            deadline = time.monotonic() + timeout
            while pid is not None and time.monotonic() < deadline:
                if self._pid() is None or _is_zombie(pid):
                    break
                time.sleep(0.05)
            else:
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self._pid_path.unlink(missing_ok=True)
            (self.repo / "api").unlink(missing_ok=True)
            return True


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
