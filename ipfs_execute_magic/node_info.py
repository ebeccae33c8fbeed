"""What node the tool uses, where it answers and what it holds (`ipfs-execute node status`,
`%ipfs_node`, `ie.node_status()`): the front ends only print a `NodeInfo`.

Asking never starts the embedded node. For the user's own daemon (IPFS_EXECUTE_API) the
gateway comes from its config and the size from `repo stat`, through the RPC API.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import IpfsError
from .links import Gateway, link_gateway
from .node import EmbeddedNode, stored_gateway_url
from .settings import Settings, format_bytes
from .staging_cache import disk_usage


@dataclass(frozen=True)
class NodeInfo:
    embedded: bool  # the tool's own node in the data directory, or the user's daemon
    running: bool
    api: str | None  # RPC API multiaddr (the embedded node's only while it runs)
    gateway: str | None  # the node's own HTTP gateway, base URL
    links: Gateway  # where links in results point (Settings.gateway, else the node's)
    repo: Path | None  # the embedded node's repo
    repo_size: int | None  # bytes; None when the daemon will not say
    pid: int | None = None

    def describe(self) -> str:
        size = "unknown" if self.repo_size is None else format_bytes(self.repo_size)
        lines = []
        if self.embedded:
            state = f"running (pid {self.pid})" if self.running else "stopped (starts on first use)"
            lines.append(f"node:    embedded, {state}")
            lines.append(f"repo:    {self.repo}")  # alone on its line: `sed` takes it for IPFS_PATH
        else:
            state = "answers" if self.running else "does not answer"
            lines.append(f"node:    your own daemon (IPFS_EXECUTE_API / --api), {state}")
        lines.append(f"size:    {size}")
        lines.append(f"api:     {self.api or '-'}")
        idle = " (when it runs)" if self.gateway and not self.running else ""
        lines.append(f"gateway: {self.gateway or '-'}{idle}")
        style = "" if self.links.style == "path" else f", {self.links.style} style"
        lines.append(f"links:   {self.links.base}{style} (IPFS_EXECUTE_GATEWAY to change)")
        if self.embedded and self.running:
            lines.append(
                f"use the Kubo CLI with it: IPFS_PATH={self.repo} ipfs ...  "
                f"(or ipfs --api={self.api} ...)"
            )
        return "\n".join(lines)


def node_status(settings: Settings) -> NodeInfo:
    if settings.api is None:
        node = EmbeddedNode(settings)
        status = node.status()
        repo_size = disk_usage(node.repo) if node.repo.is_dir() else 0
        return NodeInfo(
            embedded=True,
            running=status.running,
            api=status.api,
            gateway=stored_gateway_url(settings.home),
            links=link_gateway(settings),
            repo=node.repo,
            repo_size=repo_size,
            pid=status.pid,
        )
    from .store import Store  # the HTTP client, only for a daemon of the user's

    store = Store(settings.api, fetch_timeout=settings.fetch_timeout, auth=settings.api_auth)
    try:
        try:
            store.version()
            running = True
        except IpfsError:
            running = False
        gateway = store.gateway_url() if running else None
        return NodeInfo(
            embedded=False,
            running=running,
            api=settings.api,
            gateway=gateway,
            links=link_gateway(settings, store if running else None),
            repo=None,
            repo_size=store.repo_size() if running else None,
        )
    finally:
        store.close()
