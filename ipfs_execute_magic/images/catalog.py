"""The example images in the data directory: built once, added to IPFS, looked up afterwards.

`ensure(name, settings, store)` returns an image's CID. The tarball is kept at
HOME/images/NAME.tar.gz beside NAME.json (its CID, sha256 and recipe). A later call checks
only that the record still holds (same recipe, same tarball bytes) and that the node still
pins the CID: a few milliseconds. It rebuilds when the tarball is gone or changed or the
recipe changed (new pins), and adds the tarball again when the node lost the CID. Builds of
one image take turns (an flock on HOME/images/.NAME.lock): a second caller waits, then finds
the first one's record. `remove_built` (`gc --images`) deletes tarballs and records under the
same flock, skipping an image whose flock is held.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cid import EMPTY_DIRECTORY_CID
from ..errors import ImageBuildError, UsageError
from ..files import replace_file
from . import builders
from .debinstall import InstallError

if TYPE_CHECKING:
    from ..settings import Settings
    from ..store import Store

NAMES = builders.IMAGES
RECORD_VERSION = 1

ProgressCallback = Callable[[str], None]


@dataclass(frozen=True)
class ImageInfo:
    """One example image as the data directory knows it (`cid` None: not built here yet)."""

    name: str
    cid: str | None
    tarball: Path | None
    size: int | None
    built_at: str | None

    def describe(self) -> str:
        if self.cid is None:
            return f"{self.name:<12} (not built yet)"
        size = f"{self.size / 1e6:.1f} MB" if self.size is not None else "a directory"
        return f"{self.name:<12} {self.cid}  {size:>8}  {self.built_at or ''}"


def canonical_name(name: str) -> str:
    """`pkg_install` (a Python name) is `pkg-install`; anything unknown is a usage error."""
    image = name.strip().replace("_", "-")
    if image not in NAMES:
        raise UsageError(f"unknown image {name!r}: choose one of {', '.join(NAMES)}")
    return image


def images_dir(settings: Settings) -> Path:
    return settings.home / "images"


def ensure(
    name: str,
    settings: Settings,
    store: Store,
    *,
    on_progress: ProgressCallback | None = None,
    epoch: int | None = None,
) -> str:
    """The CID of the example image `name`, built and added on first use."""
    image = canonical_name(name)
    say = on_progress or (lambda _text: None)
    if image == "empty":
        return store.empty_directory()
    directory = images_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    tarball = directory / f"{image}.tar.gz"
    with _locked(directory / f".{image}.lock"):
        recipe = builders.recipe(image, epoch)
        record = _read_record(directory, image)
        current = (
            record is not None
            and record.get("recipe") == recipe
            and tarball.is_file()
            and _sha256(tarball) == record.get("sha256")
        )
        if current and record is not None:
            cid = str(record["cid"])
            if store.is_pinned(cid):
                return cid
            say(f"{image}: the IPFS node no longer has {cid}: adding {tarball} again")
        else:
            say(f"{image}: building {tarball} (once; later calls reuse it)")
            started = time.monotonic()
            try:
                builders.build(image, directory, epoch=epoch)
            except (builders.BuildError, InstallError) as error:
                raise ImageBuildError(f"building the {image} image failed: {error}") from None
            say(
                f"{image}: built {tarball.stat().st_size / 1e6:.1f} MB in "
                f"{time.monotonic() - started:.1f} s; adding it to IPFS"
            )
        cid = store.add_path(tarball)
        _write_record(
            directory,
            image,
            {
                "version": RECORD_VERSION,
                "name": image,
                "cid": cid,
                "sha256": _sha256(tarball),
                "size": tarball.stat().st_size,
                "recipe": recipe,
                "built_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        )
        return cid


def list_images(settings: Settings) -> list[ImageInfo]:
    """Every example image and what the data directory holds of it; no daemon needed."""
    directory = images_dir(settings)
    infos = []
    for image in NAMES:
        if image == "empty":
            infos.append(ImageInfo(image, EMPTY_DIRECTORY_CID, None, None, None))
            continue
        record = _read_record(directory, image)
        tarball = directory / f"{image}.tar.gz"
        if record is None or not tarball.is_file():
            infos.append(ImageInfo(image, None, None, None, None))
            continue
        infos.append(
            ImageInfo(
                image,
                str(record["cid"]),
                tarball,
                tarball.stat().st_size,
                str(record.get("built_at") or "") or None,
            )
        )
    return infos


@dataclass(frozen=True)
class RemovedImages:
    """What `remove_built` deleted (image names, bytes on disk) and the built images it left."""

    names: list[str]
    bytes: int
    left: list[str]


def remove_built(settings: Settings) -> RemovedImages:
    """Delete the built tarballs and their records in HOME/images (and what builds killed
    midway left). The next use of an image builds it again, to the same CID while its recipe
    is unchanged; its content stays pinned in the node meanwhile. An image being built or
    looked up right now holds its lock and is left alone."""
    directory = images_dir(settings)
    names: list[str] = []
    left: list[str] = []
    removed_bytes = 0
    for image in NAMES:
        if image == "empty" or not _built_files(directory, image):
            continue
        with _locked_if_free(directory / f".{image}.lock") as free:
            if not free:
                left.append(image)  # being built or looked up right now
                continue
            for path in _built_files(directory, image):
                with suppress(OSError):
                    size = path.lstat().st_blocks * 512
                    path.unlink()
                    removed_bytes += size
            names.append(image)
    return RemovedImages(names, removed_bytes, left)


def _built_files(directory: Path, image: str) -> list[Path]:
    """The image's tarball and record, and temporary files of builds killed midway."""
    files = [directory / f"{image}.tar.gz", directory / f"{image}.json"]
    return [
        *(path for path in files if path.exists()),
        *directory.glob(f".{image}.tar.gz.*.tmp"),
        *directory.glob(f".{image}.json.*.tmp"),
    ]


@contextmanager
def _locked_if_free(path: Path) -> Iterator[bool]:
    """Yields True with the flock held, False when someone else holds it."""
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_record(directory: Path, image: str) -> dict[str, Any] | None:
    try:
        record = json.loads((directory / f"{image}.json").read_text())
    except (OSError, ValueError):
        return None  # none yet, or unreadable: build again
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        return None
    return record


def _write_record(directory: Path, image: str, record: dict[str, Any]) -> None:
    path = directory / f"{image}.json"
    replace_file(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
