"""What the data directory holds (`du`) and freeing what can go (`gc`).

The parts: the staging cache (trees staged from CIDs: always re-creatable), the node's repo
(Kubo's blocks; the embedded node's only), kept outputs (outputs produced while IPFS was
unreachable: the only copy, so `gc` removes them only when asked), run directories (a run
in progress holds its directory's flock; one nobody holds belongs to a process that died),
the /output templates (formatted images runs copy: made again on demand; a run copying one
holds a shared flock on their directory) and the example images' built tarballs (what
`ie.images.*` returns at once: `gc` removes them only when asked, and they are built again,
to the same CID, on next use).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import sandbox
from .settings import Settings, format_bytes
from .staging_cache import CacheEntry, StagingCache, disk_usage, remove_tree
from .store import Store

__all__ = [
    "DiskUsage",
    "GcReport",
    "PathUsage",
    "collect",
    "format_bytes",
    "usage",
]

# A run makes its directory a moment before it locks it: younger ones are left alone.
_RUN_DIR_GRACE_S = 60.0


@dataclass(frozen=True)
class PathUsage:
    path: Path
    bytes: int
    stale: bool = False  # a run directory whose process died


@dataclass(frozen=True)
class DiskUsage:
    home: Path
    staging: list[CacheEntry]  # least recently used first
    staging_limit_bytes: int
    node_repo_bytes: int | None  # None: the user's own daemon (--api), not in the data directory
    kept_outputs: list[PathUsage]
    runs: list[PathUsage]
    output_templates: list[PathUsage]
    images: list[PathUsage]  # one per built image: its tarball, bytes with its record
    images_bytes: int  # all of HOME/images (with what builds killed midway left)

    @property
    def staging_bytes(self) -> int:
        return sum(entry.bytes for entry in self.staging)

    @property
    def kept_outputs_bytes(self) -> int:
        return sum(kept.bytes for kept in self.kept_outputs)

    @property
    def runs_bytes(self) -> int:
        return sum(run.bytes for run in self.runs)

    @property
    def output_templates_bytes(self) -> int:
        return sum(template.bytes for template in self.output_templates)

    @property
    def total_bytes(self) -> int:
        return (
            self.staging_bytes
            + (self.node_repo_bytes or 0)
            + self.kept_outputs_bytes
            + self.runs_bytes
            + self.output_templates_bytes
            + self.images_bytes
        )

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def lines(self) -> list[str]:
        in_use = sum(1 for entry in self.staging if entry.in_use)
        stale = [run for run in self.runs if run.stale]
        lines = [
            f"{format_bytes(self.staging_bytes):>10}  staging cache: {len(self.staging)} "
            f"entries, {in_use} in use (limit {format_bytes(self.staging_limit_bytes)})",
            (
                f"{format_bytes(self.node_repo_bytes):>10}  node repo"
                if self.node_repo_bytes is not None
                else f"{'-':>10}  node repo: your own daemon (--api), not counted here"
            ),
            f"{format_bytes(self.kept_outputs_bytes):>10}  kept outputs: "
            f"{len(self.kept_outputs)} (add each with: ipfs-execute add PATH)",
            f"{format_bytes(self.runs_bytes):>10}  runs: {len(self.runs)} directories, "
            f"{len(stale)} left by processes that died",
            f"{format_bytes(self.output_templates_bytes):>10}  output templates: "
            f"{len(self.output_templates)} (formatted /output images, made again when needed)",
            f"{format_bytes(self.images_bytes):>10}  images: "
            + (
                f"{', '.join(_image_name(image.path) for image in self.images)} built "
                "(gc --images deletes them: built again on next use)"
                if self.images
                else "none built"
            ),
        ]
        lines += [f"{format_bytes(kept.bytes):>10}    {kept.path}" for kept in self.kept_outputs]
        lines.append(f"{format_bytes(self.total_bytes):>10}  total in {self.home}")
        return lines


@dataclass(frozen=True)
class GcReport:
    staging_entries: int
    staging_bytes: int
    runs: int
    runs_bytes: int
    repo_blocks: int | None  # None: not collected (the user's own daemon)
    repo_bytes: int
    kept_outputs: int
    kept_outputs_bytes: int
    kept_outputs_left: int  # kept outputs still there (gc without kept_outputs=True)
    output_templates: int | None  # None: a run was taking one, all were left
    output_templates_bytes: int
    images: list[str]  # names of the images whose built tarballs were deleted
    images_bytes: int
    images_left: list[str]  # built images still there (without images=True, or being built)

    @property
    def total_bytes(self) -> int:
        return (
            self.staging_bytes
            + self.runs_bytes
            + self.repo_bytes
            + self.kept_outputs_bytes
            + self.output_templates_bytes
            + self.images_bytes
        )

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def lines(self) -> list[str]:
        lines = [
            f"{format_bytes(self.staging_bytes):>10}  staging cache: {self.staging_entries} "
            "entries no run was using",
            f"{format_bytes(self.runs_bytes):>10}  runs: {self.runs} directories of processes "
            "that died",
            (
                f"{format_bytes(self.repo_bytes):>10}  node repo: {self.repo_blocks} unpinned "
                "blocks (outputs, records and the result index are pinned and kept)"
                if self.repo_blocks is not None
                else f"{'-':>10}  node repo: your own daemon (--api), left alone"
            ),
            f"{format_bytes(self.kept_outputs_bytes):>10}  kept outputs: {self.kept_outputs} "
            f"deleted, {self.kept_outputs_left} kept"
            + (" (--kept-outputs deletes them)" if self.kept_outputs_left else ""),
            (
                f"{format_bytes(self.output_templates_bytes):>10}  output templates: "
                f"{self.output_templates} deleted (made again when needed)"
                if self.output_templates is not None
                else f"{'-':>10}  output templates: a run was using them, left"
            ),
            f"{format_bytes(self.images_bytes):>10}  images: "
            + (", ".join(self.images) if self.images else "none")
            + " deleted"
            + (
                f", {', '.join(self.images_left)} kept (--images deletes them)"
                if self.images_left
                else ""
            ),
            f"{format_bytes(self.total_bytes):>10}  freed in total",
        ]
        return lines


def usage(settings: Settings) -> DiskUsage:
    """What the data directory holds, part by part. Walks the node repo, kept outputs, run
    directories, templates and images; the staging cache's sizes were recorded when it was
    filled."""
    from .images import catalog

    return DiskUsage(
        home=settings.home,
        staging=StagingCache(settings.staging_dir).usage(),
        staging_limit_bytes=settings.staging_limit_bytes,
        node_repo_bytes=None if settings.api else disk_usage(settings.repo_dir),
        kept_outputs=[
            PathUsage(path, disk_usage(path)) for path in _children(settings.kept_outputs_dir)
        ],
        runs=[
            PathUsage(path, disk_usage(path), stale=_is_stale_run(path))
            for path in _children(settings.runs_dir)
        ],
        output_templates=[
            PathUsage(path, disk_usage(path)) for path in _children(settings.output_templates_dir)
        ],
        images=[
            PathUsage(image.tarball, disk_usage(image.tarball) + disk_usage(_record(image.tarball)))
            for image in catalog.list_images(settings)
            if image.tarball is not None
        ],
        images_bytes=disk_usage(catalog.images_dir(settings)),
    )


def collect(
    settings: Settings,
    store: Store | None,
    *,
    staging_keep_bytes: int = 0,
    kept_outputs: bool = False,
    images: bool = False,
) -> GcReport:
    """Free what can be freed: staging entries no run holds (down to `staging_keep_bytes`),
    directories of runs whose process died, the node's unpinned blocks (`store`: the embedded
    node; None skips them), the /output templates unless a run is taking one, and, only when
    asked, the kept outputs and the example images' built tarballs (`images`)."""
    from .images import catalog
    from .sandbox.output_area import remove_templates

    staging = StagingCache(settings.staging_dir)
    evicted = staging.evict(staging_keep_bytes)
    staging.sweep_use_locks()

    runs = runs_bytes = 0
    if settings.runs_dir.is_dir():
        sandbox.release_stale_outputs(settings.runs_dir)  # unmounts images of dead runs first
        for run_dir in _children(settings.runs_dir):
            size = disk_usage(run_dir)
            if _remove_stale_run(run_dir):
                runs += 1
                runs_bytes += size

    repo_blocks: int | None = None
    repo_bytes = 0
    if store is not None and not settings.api:
        before = disk_usage(settings.repo_dir)
        repo_blocks = store.repo_gc()
        repo_bytes = max(0, before - disk_usage(settings.repo_dir))

    removed = removed_bytes = 0
    kept = _children(settings.kept_outputs_dir)
    if kept_outputs:
        for path in kept:
            size = disk_usage(path)
            remove_tree(path)
            removed += 1
            removed_bytes += size

    templates = remove_templates(settings.output_templates_dir)

    if images:
        removed_images = catalog.remove_built(settings)
    else:
        built = [image.name for image in catalog.list_images(settings) if image.tarball is not None]
        removed_images = catalog.RemovedImages(names=[], bytes=0, left=built)
    return GcReport(
        staging_entries=len(evicted),
        staging_bytes=sum(entry.bytes for entry in evicted),
        runs=runs,
        runs_bytes=runs_bytes,
        repo_blocks=repo_blocks,
        repo_bytes=repo_bytes,
        kept_outputs=removed,
        kept_outputs_bytes=removed_bytes,
        kept_outputs_left=len(kept) - removed,
        output_templates=None if templates is None else templates[0],
        output_templates_bytes=0 if templates is None else templates[1],
        images=removed_images.names,
        images_bytes=removed_images.bytes,
        images_left=removed_images.left,
    )


def _record(tarball: Path) -> Path:
    """HOME/images/NAME.json beside NAME.tar.gz."""
    return tarball.with_name(tarball.name.removesuffix(".tar.gz") + ".json")


def _image_name(tarball: Path) -> str:
    return tarball.name.removesuffix(".tar.gz")


def _children(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


@contextlib.contextmanager
def _unheld_run(run_dir: Path) -> Iterator[bool]:
    """Yields True with the run directory's flock held if no live run holds it."""
    if time.time() - run_dir.lstat().st_mtime < _RUN_DIR_GRACE_S or not run_dir.is_dir():
        yield False
        return
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _is_stale_run(run_dir: Path) -> bool:
    with _unheld_run(run_dir) as stale:
        return bool(stale)


def _remove_stale_run(run_dir: Path) -> bool:
    with _unheld_run(run_dir) as stale:
        if not stale or os.path.ismount(run_dir / "output"):
            return False  # a mount that could not be undone stays (and is seen by `du`)
        remove_tree(run_dir)
        return True
