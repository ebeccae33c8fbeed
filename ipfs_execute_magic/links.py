"""Links to IPFS content through an HTTP gateway: which gateway, and how a link is spelled.

Links end up in saved notebooks, so the default must still work tomorrow: the embedded node's
own gateway on the port kept for its data directory (`node.stored_gateway_url`), never the
random port of one daemon's life. A user who shares notebooks names a public or team gateway
instead (`Settings.gateway`), in path style (`https://GW/ipfs/CID/sub`) or subdomain style
(`https://CID.ipfs.GW/sub`, each CID its own web origin).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .cid import cid_base32
from .errors import IpfsExecuteError
from .node import stored_gateway_url
from .settings import Settings, parse_gateway, parse_gateway_style

if TYPE_CHECKING:
    from .store import Store

PUBLIC_GATEWAY = "https://ipfs.io"


@dataclass(frozen=True)
class Gateway:
    """An HTTP gateway's base URL (scheme and host) and its style: "path" or "subdomain"."""

    base: str
    style: str = "path"

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", parse_gateway(self.base))
        object.__setattr__(self, "style", parse_gateway_style(self.style))

    def __str__(self) -> str:
        return self.base

    def url(self, cid: str, path: str = "", namespace: str = "ipfs") -> str:
        """The link to `cid` (and a path inside it); `path` is quoted here."""
        sub = f"/{urllib.parse.quote(path.strip('/'))}" if path.strip("/") else ""
        scheme, _, host = self.base.partition("://")
        # A DNSLink name (with dots) needs the gateway's own inlining rules: path style it is.
        if self.style == "subdomain" and "." not in cid:
            label = cid_base32(cid) if namespace == "ipfs" else cid.lower()
            return f"{scheme}://{label}.{namespace}.{host}{sub}"
        return f"{self.base}/{namespace}/{cid}{sub}"

    def path_url(self, ipfs_path: str) -> str:
        """The link to `/ipfs/CID/sub` or `/ipns/NAME/sub`."""
        namespace, _, rest = ipfs_path.strip("/").partition("/")
        root, _, sub = rest.partition("/")
        if namespace not in ("ipfs", "ipns") or not root:
            namespace, root, sub = "ipfs", *ipfs_path.strip("/").partition("/")[::2]
        return self.url(root, sub, namespace)


def as_gateway(gateway: Gateway | str) -> Gateway:
    """A Gateway from itself or from a base URL (path style); empty: the public gateway."""
    if isinstance(gateway, Gateway):
        return gateway
    return Gateway(gateway.rstrip("/") or PUBLIC_GATEWAY)


def link_gateway(settings: Settings, store: Store | None = None) -> Gateway:
    """The gateway links point to: the configured one; else the embedded node's stable
    gateway; else the gateway of the user's own daemon (its config, asked through `store`);
    else the public one."""
    if settings.gateway:
        return Gateway(settings.gateway, settings.gateway_style)
    if settings.api is None:
        url = stored_gateway_url(settings.home)
        if url:
            return Gateway(url)
    if store is not None:
        try:
            url = store.gateway_url()
        except IpfsExecuteError:
            url = None
        if url:
            return Gateway(url)
    return Gateway(PUBLIC_GATEWAY)
