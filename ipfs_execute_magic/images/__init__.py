"""The example images, part of the package: `ie.images.busybox()` returns a CID.

    import ipfs_execute_magic as ie
    busybox = ie.images.busybox()      # built on first use into the data directory
    result = ie.run(busybox, data, "sh", "-c", "ls /input > /output/ls")

Each image is built reproducibly (pinned Debian packages: the same bytes, hence the same CID,
on every machine), added to the process's IPFS node and remembered in HOME/images; a later
call is a lookup. `builders` holds the builders themselves (no IPFS), `catalog` the data
directory's record of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..result import IpfsRef
    from .catalog import ImageInfo

__all__ = ["NAMES", "build", "busybox", "empty", "list_images", "pkg_install", "python"]

NAMES = ("busybox", "empty", "python", "pkg-install")


def build(name: str, *, on_progress: Callable[[str], None] | None = None) -> IpfsRef:
    """The CID of the example image `name` (busybox, empty, python, pkg-install), built and
    added on first use; `on_progress(text)` hears about a build while it happens."""
    from .. import default_runner
    from ..result import IpfsRef
    from .catalog import ensure

    runner = default_runner()
    cid = ensure(name, runner.settings, runner.store, on_progress=on_progress)
    return IpfsRef(cid, runner.store)


def busybox(*, on_progress: Callable[[str], None] | None = None) -> IpfsRef:
    """Debian's busybox-static (sh and ~270 applets); /sbin/init runs its arguments."""
    return build("busybox", on_progress=on_progress)


def python(*, on_progress: Callable[[str], None] | None = None) -> IpfsRef:
    """The busybox image plus Python 3.11 and its standard library (`--interpreter python3`)."""
    return build("python", on_progress=on_progress)


def pkg_install(*, on_progress: Callable[[str], None] | None = None) -> IpfsRef:
    """The python image whose /sbin/init installs .debs into a rootfs (see docs/images.md)."""
    return build("pkg-install", on_progress=on_progress)


def empty() -> IpfsRef:
    """The CID of an empty directory: the input of runs that need none."""
    return build("empty")


def list_images() -> list[ImageInfo]:
    """Every example image and its CID when built in this data directory (else None)."""
    from .. import default_runner
    from .catalog import list_images as listed

    return listed(default_runner().settings)
