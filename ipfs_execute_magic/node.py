"""The embedded Kubo node: a private daemon the tool starts on first use and then reuses.

The repo lives in the data directory (``Settings.repo_dir``). It is initialised with the
``test,unixfs-v1-2025`` profiles: swarm on a random loopback port, no bootstrap, no mDNS,
and the import settings that make CIDs reproducible. It runs offline unless asked.

Its gateway listens on a loopback port chosen once per data directory and kept in
``HOME/gateway-port``: links saved in a notebook (`http://127.0.0.1:PORT/ipfs/CID`) work again
after a restart. A port another process has taken by then is replaced by the next free one,
with one line on stderr saying so.

Only its owner can reach it: the RPC API listens on a unix socket inside the repo, a directory
only the owner can enter (0700), instead of a loopback TCP port that every local user can
connect to. Every start rewrites the settings this relies on (API address, gateway on loopback,
no other credentials), so repos made by older versions are migrated while the daemon is stopped.

Several processes may want the node at once: an exclusive file lock around "is it running? if
not, start it" makes exactly one of them start the daemon and the others wait and reuse it. The
wait is bounded: past `LOCK_TIMEOUT_S` the error names the process holding the lock.

`store` is the one module that talks to Kubo's RPC API for content. This module manages the
daemon's life only (init, start, readiness, stop); its RPC calls, the readiness probe
(`POST /api/v0/id`) and shutdown, go through `rpc_http` (the Store's own HTTP, on bare sockets)
because they must work before any Store exists (a Store checks the daemon's version on
connect).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from . import rpc_http
from .errors import NodeError
from .settings import KUBO_VERSION, Settings

INIT_PROFILES = "test,unixfs-v1-2025"
START_TIMEOUT_S = 60.0
# Longer than a normal start (a waiter returns as soon as the daemon answers), short enough
# that a stuck holder is reported instead of hanging every later run.
LOCK_TIMEOUT_S = 10.0
SOCKET_NAME = "api.sock"
GATEWAY_PORT_NAME = "gateway-port"
# Stable gateway ports come from below Linux's ephemeral range (32768-60999), where outgoing
# connections would take them at random.
_GATEWAY_PORTS = range(20000, 30000)
LOCK_NAME = "ipfs-execute.lock"
# A unix socket path is at most 107 bytes (sun_path is 108 with its NUL; Go refuses 108).
_SOCKET_PATH_MAX = 107
# ipfshttpclient carries a socket path in the URL's host name, which gets lowercased and
# mangled: only these characters survive the trip (measured: capitals, spaces, "~+,=@%" and
# non-ASCII letters all failed to connect).
_REACHABLE_SOCKET_PATH = re.compile(r"/[a-z0-9/._-]+")
_LOOPBACK_PREFIXES = ("/ip4/127.", "/ip6/::1/")


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


def rpc_post(multiaddr: str, path: str, timeout: float) -> int:
    """POST one RPC path (`/api/v0/id`) to the daemon at `multiaddr`; the HTTP status."""
    try:
        endpoint = rpc_http.parse_multiaddr(multiaddr)
    except rpc_http.AddressError:
        url = urllib.parse.urlsplit(api_url(multiaddr))  # NodeError if not an http URL either
        if url.scheme != "http" or not url.hostname or url.port is None:
            raise NodeError(
                f"cannot probe {multiaddr!r}: only plain http is supported here"
            ) from None
        endpoint = rpc_http.Endpoint(None, url.hostname, url.port, False, url.netloc)
    client = rpc_http.Client(endpoint, "", {}, timeout=timeout)
    try:
        return client.request(path, ()).status
    finally:
        client.close()


def daemon_answers(multiaddr: str, timeout: float = 2.0) -> bool:
    """True when a Kubo daemon answers POST /api/v0/id at this address."""
    try:
        return rpc_post(multiaddr, "/api/v0/id", timeout) == 200
    except (NodeError, OSError, rpc_http.ProtocolError, ValueError):
        return False


def reachable_socket_path(path: str) -> bool:
    """True when the HTTP client can connect to a unix socket at this path."""
    return (
        len(os.fsencode(path)) <= _SOCKET_PATH_MAX
        and _REACHABLE_SOCKET_PATH.fullmatch(path) is not None
    )


def private_directory(path: Path) -> Path:
    """`path` as a directory only this user can enter: 0700, owned by us, not a symlink."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise NodeError(
            f"{path} is not a directory owned by uid {os.geteuid()}: the embedded node keeps "
            "its repo, lock and API socket there; remove it, or use another data directory "
            "(--home / IPFS_EXECUTE_HOME)"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)  # mkdir's mode is cut by the umask; older versions made 0755
    return path


def _open_private(path: Path, flags: int) -> int:
    """Open (creating if needed) a file only its owner can read or write, whatever the umask."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also tightens a file an older version made 0644
    except OSError:
        os.close(fd)
        raise
    return fd


def _write_private(path: Path, text: str) -> None:
    fd = _open_private(path, os.O_WRONLY | os.O_TRUNC)
    with open(fd, "w") as file:
        file.write(text)


def default_gateway_port(home: Path) -> int:
    """The first gateway port tried for a data directory: derived from its path, so that two
    data directories of one user rarely want the same port."""
    digest = int.from_bytes(hashlib.sha256(os.fsencode(home)).digest()[:4], "big")
    return _GATEWAY_PORTS.start + digest % len(_GATEWAY_PORTS)


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:`port` (a closed connection's TIME_WAIT is no
    obstacle: Kubo binds with SO_REUSEADDR, as this probe does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stored_gateway_port(home: Path) -> int | None:
    """The embedded node's gateway port for this data directory, once it was chosen."""
    try:
        port = int((home / GATEWAY_PORT_NAME).read_text().strip())
    except (OSError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def stored_gateway_url(home: Path) -> str | None:
    """`http://127.0.0.1:PORT`: the embedded node's gateway, running or not, once chosen."""
    port = stored_gateway_port(home)
    return f"http://127.0.0.1:{port}" if port else None


def _describe_process(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = [word.decode(errors="replace") for word in cmdline.read().split(b"\0") if word]
    except OSError:
        return f"pid {pid}"
    return f"pid {pid} ({' '.join(argv)[:120]})" if argv else f"pid {pid}"


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


class NodeStatus(NamedTuple):
    repo: Path
    api: str | None  # multiaddr, when running
    pid: int | None
    running: bool


class EmbeddedNode:
    """A private Kubo daemon in ``settings.repo_dir``, shared by every process that uses it."""

    def __init__(self, settings: Settings, *, lock_timeout: float = LOCK_TIMEOUT_S) -> None:
        self.settings = settings
        self.repo = settings.repo_dir
        self.lock_timeout = lock_timeout
        # Inside the 0700 repo: no other user can open it, so none can hold it.
        self._lock_path = self.repo / LOCK_NAME
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

    def socket_path(self) -> Path:
        """Where the RPC API listens: in the repo, or, when the HTTP client cannot reach that
        path (too long for a unix socket, or characters it mangles), in a private per-user
        directory under a name derived from the repo's path."""
        in_repo = self.repo / SOCKET_NAME
        if reachable_socket_path(str(in_repo)):
            return in_repo
        runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        if not reachable_socket_path(f"{runtime}/ipfs-execute-{os.geteuid()}/{'0' * 16}.sock"):
            runtime = "/tmp"
        directory = private_directory(Path(runtime) / f"ipfs-execute-{os.geteuid()}")
        return directory / f"{hashlib.sha256(os.fsencode(self.repo)).hexdigest()[:16]}.sock"

    def api_multiaddr(self) -> str:
        return f"/unix{self.socket_path()}"

    def running_api(self) -> str | None:
        """The API multiaddr of the running daemon, or None. A stale api file is not enough,
        and neither is a daemon listening anywhere but the private socket (an older version's
        TCP port: it is restarted on the socket by `ensure_running`)."""
        api = self._api_from_file()
        if api and api == self.api_multiaddr() and daemon_answers(api):
            return api
        return None

    def status(self) -> NodeStatus:
        api = self.running_api()
        return NodeStatus(
            repo=self.repo, api=api, pid=self._pid() if api else None, running=api is not None
        )

    # -- lifecycle ---------------------------------------------------------------------------

    @contextmanager
    def _locked(self, ready: Callable[[], str | None] | None = None) -> Iterator[str | None]:
        """Hold the node lock; yields None. Waits at most `lock_timeout` seconds, then fails
        naming the holder. With `ready`, waiting also ends when `ready()` gives an API address
        (another process started the daemon): that address is yielded, without the lock."""
        self.settings.home.mkdir(parents=True, exist_ok=True)
        private_directory(self.repo)
        fd = _open_private(self._lock_path, os.O_RDWR)
        try:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                api = ready() if ready is not None else None
                if api:
                    yield api
                    return
                if time.monotonic() >= deadline:
                    raise self._lock_timeout_error(fd)
                time.sleep(0.05)
            # Who holds it, for the error of whoever waits too long.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield None
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _lock_timeout_error(self, fd: int) -> NodeError:
        try:
            holder = _describe_process(int(os.pread(fd, 32, 0).decode().strip()))
        except (OSError, ValueError):
            holder = "another process"
        return NodeError(
            f"the embedded node's lock {self._lock_path} is still held by {holder} after "
            f"{self.lock_timeout:g} s: wait for it to finish, or stop it if it hangs "
            "(`kill PID`), then try again"
        )

    def ensure_running(self) -> str:
        """Start the daemon unless it already runs; return its API multiaddr."""
        api = self.running_api()
        if api:
            return api
        with self._locked(ready=self.running_api) as started_elsewhere:
            if started_elsewhere:
                return started_elsewhere
            api = self.running_api()  # another process may have started it just before
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
        private_directory(self.repo)
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

    def _configure(self) -> None:
        """Rewrite, while the daemon is stopped, the settings the node's privacy relies on:
        the API on the private socket only, no other credentials, the gateway on loopback.
        Repos made before the API moved to the socket are migrated here."""
        config_path = self.repo / "config"
        try:
            config = json.loads(config_path.read_text())
            addresses = config.setdefault("Addresses", {})
            api_section = config.setdefault("API", {})
            gateway_section = config.setdefault("Gateway", {})
        except (OSError, ValueError, AttributeError) as error:
            raise NodeError(
                f"cannot read the embedded node's config {config_path} ({error}): "
                f"move {self.repo} aside to start with a new node"
            ) from None
        before = json.dumps(config, sort_keys=True)
        addresses["API"] = [self.api_multiaddr()]
        if self.settings.swarm:
            addresses["Swarm"] = list(self.settings.swarm)
        # Any other user can reach the gateway's port, so it serves loopback only, read-only;
        # on one port per data directory, so that saved links keep working.
        gateways = addresses.get("Gateway") or []
        gateways = [gateways] if isinstance(gateways, str) else list(gateways)
        loopback = [
            address
            for address in gateways
            if isinstance(address, str) and address.startswith(_LOOPBACK_PREFIXES)
        ]
        addresses["Gateway"] = [f"/ip4/127.0.0.1/tcp/{self._gateway_port(loopback)}"]
        # The socket is the credential; a secret here would only lock the tool out.
        api_section.pop("Authorizations", None)
        gateway_section.pop("Writable", None)  # gone since Kubo 0.20; never let it come back
        if json.dumps(config, sort_keys=True) == before:
            return
        temporary = self.repo / "config.ipfs-execute-new"
        temporary.unlink(missing_ok=True)
        fd = _open_private(temporary, os.O_WRONLY | os.O_EXCL)
        with open(fd, "w") as file:
            json.dump(config, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, config_path)

    def _gateway_port(self, configured: list[str]) -> int:
        """The gateway's port for this start (the lock is held): the one stored in the data
        directory; at the first start, a port the repo's config already fixed (a user's
        choice) or one derived from the data directory's path. Taken by another process:
        the next free one, stored, and said in one line."""
        path = self.settings.home / GATEWAY_PORT_NAME
        stored = stored_gateway_port(self.settings.home)
        wanted = stored
        if wanted is None:
            fixed = [
                int(a.split("/")[4])
                for a in configured
                if re.fullmatch(r"/ip4/[^/]+/tcp/[1-9][0-9]*", a)
            ]
            wanted = fixed[0] if fixed else default_gateway_port(self.settings.home)
        port = wanted
        for _ in range(len(_GATEWAY_PORTS)):
            if port_is_free(port):
                break
            port = port + 1 if port + 1 in _GATEWAY_PORTS else _GATEWAY_PORTS.start
        else:
            raise NodeError(
                f"no free loopback port for the embedded node's gateway in "
                f"{_GATEWAY_PORTS.start}-{_GATEWAY_PORTS.stop - 1}: free one, or write a free "
                f"port into {path}"
            )
        if stored is not None and port != stored:
            print(
                f"ipfs-execute: the embedded node's gateway port {stored} is taken by another "
                f"process; using {port} from now on (kept in {path})",
                file=sys.stderr,
            )
        if port != stored:
            _write_private(path, f"{port}\n")
        return port

    def _start(self) -> str:
        binary = find_kubo_binary(self.settings)
        self._init_repo(binary)
        # A daemon of this repo that does not answer on the socket (an older version's, on
        # TCP) still holds the repo: stop it before its config is rewritten.
        self._stop_daemon(timeout=20.0)
        self._configure()
        expected_api = self.api_multiaddr()
        # Readiness is "api file written", so clear old ones; a crashed daemon's socket file
        # would stop the next one from listening.
        (self.repo / "api").unlink(missing_ok=True)
        self.socket_path().unlink(missing_ok=True)
        args = [binary, "daemon"]
        if not self.settings.online:
            args.append("--offline")
        log_path = self.settings.home / "node.log"
        log = _open_private(log_path, os.O_WRONLY | os.O_APPEND)
        try:
            process = subprocess.Popen(
                args,
                env=self._kubo_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(log)
        _write_private(self._pid_path, f"{process.pid}\n")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise NodeError(
                    f"the embedded Kubo daemon exited with status {process.returncode}"
                    f" while starting; see {log_path}"
                )
            api = self._api_from_file()
            if api == expected_api and daemon_answers(api):
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
            return self._stop_daemon(timeout)

    def _stop_daemon(self, timeout: float) -> bool:
        """Stop this repo's daemon, wherever its API listens (the lock is held)."""
        api = self._api_from_file()
        if api and not daemon_answers(api):
            api = None
        pid = self._pid()
        if api is None and pid is None:
            return False
        if api:
            with contextlib.suppress(NodeError, OSError, rpc_http.ProtocolError):
                rpc_post(api, "/api/v0/shutdown", timeout=5)
        elif pid is not None:
            # Alive but unreachable (its socket file was removed): Kubo shuts down on SIGTERM.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
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
