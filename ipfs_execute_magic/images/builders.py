"""Reproducible builders of the example images (busybox, empty, python, pkg-install).

Each `build_*(dest_dir)` writes `dest_dir/IMAGE.tar.gz` and returns its path; the same inputs
give the same bytes, hence the same CID. Inputs are Debian packages pinned by version and
sha256 in this package's `*.lock` files, fetched once with `apt-get download` into
${XDG_CACHE_HOME:-~/.cache}/ipfs-execute/debs and verified on every build.

Packages are unpacked by `debinstall.py` (no maintainer scripts run), the same code the
pkg-install image runs inside the sandbox. Standard library only: no IPFS here (see catalog.py).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import debinstall as di
from .debinstall import PathFilter, Tree

HERE = Path(__file__).resolve().parent
IMAGES = ("busybox", "empty", "python", "pkg-install")
ARCH = "amd64"  # the locks pin amd64 packages

# Package data beside this module; the image bytes include the init scripts and debinstall.py.
BUSYBOX_LOCK = HERE / "busybox.lock"
PYTHON_LOCK = HERE / "python.lock"
BUSYBOX_INIT = HERE / "busybox-init"
PKG_INSTALL_INIT = HERE / "pkg-install-init"
ENGINE = HERE / "debinstall.py"

# Documentation is dead weight in a sandbox; copyright files stay, the licences ask for them.
DOC_FILTER = PathFilter(
    exclude=(
        "/usr/share/doc/*",
        "/usr/share/man/*",
        "/usr/share/info/*",
        "/usr/share/lintian/*",
        "/usr/share/initramfs-tools/*",
        "/usr/share/bug/*",
    ),
    include=("/usr/share/doc/*/copyright",),
)
# iconv modules (8 MB): Python's codecs never call iconv, and glibc's UTF-8 is built in.
PYTHON_FILTER = PathFilter(
    exclude=(*DOC_FILTER.exclude, "/usr/lib/x86_64-linux-gnu/gconv/*"),
    include=DOC_FILTER.include,
)

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"
NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files\n"
HOSTS = "127.0.0.1 localhost\n::1 localhost\n"  # the sandbox has only a loopback interface
# Real directories: bwrap mounts over them, and must never meet a symlink there.
MOUNT_POINTS = ("input", "output", "tmp", "proc", "dev")
SKIPPED_APPLETS = ("sbin/init", "linuxrc", "bin/busybox")  # ours, or the binary itself


class BuildError(Exception):
    """A build that cannot go on; the message says what to do."""


# ---------------------------------------------------------------- pinned packages


@dataclass(frozen=True)
class Pin:
    name: str
    version: str  # "" until --relock resolves it
    arch: str = ARCH
    sha256: str = ""

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"

    def line(self) -> str:
        return f"{self.name}={self.version} {self.arch} sha256:{self.sha256}"


def read_lock(path: Path) -> list[Pin]:
    pins = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        name, _, version = words[0].partition("=")
        arch = words[1] if len(words) > 1 else ARCH
        sha = words[2].removeprefix("sha256:") if len(words) > 2 else ""
        if len(words) > 3 or (sha and len(sha) != 64):
            raise BuildError(f"{path}:{number}: expected 'name=version arch sha256:HEX'")
        pins.append(Pin(name, version, arch, sha))
    return pins


def write_lock(path: Path, pins: list[Pin]) -> None:
    header = [ln for ln in path.read_text().splitlines() if ln.startswith("#")]
    body = [pin.line() for pin in sorted(pins, key=lambda p: p.name)]
    path.write_text("\n".join(header + body) + "\n")


def deb_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ipfs-execute" / "debs"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _apt_download(specs: list[str], into: Path) -> None:
    cmd = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        # apt's _apt user cannot write into root's directories; say so instead of warning.
        cmd += ["-o", "APT::Sandbox::User=root"]
    if shutil.which("apt-get") is None:
        raise BuildError(
            "apt-get is not available: the example images are built from "
            "Debian packages (a Debian or Ubuntu host is needed for a cold build)"
        )
    proc = subprocess.run(cmd + specs, cwd=into, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise BuildError(
            f"apt-get download {' '.join(specs)} failed:\n{detail}\n"
            "If apt knows no such package or version: run `apt-get update` (as root) first. "
            "If Debian has since replaced a pinned version, refresh the pins with "
            "`examples/build --relock IMAGE` and commit the new packages.lock."
        )


def fetch_debs(pins: list[Pin], cache: Path | None = None) -> list[Path]:
    """Paths of the pinned .debs in the cache, downloading the missing ones; sha256-checked."""
    cache = cache or deb_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    for pin in pins:
        if not pin.version or not pin.sha256:
            raise BuildError(f"{pin.name} is not pinned yet: run `examples/build --relock IMAGE`")
    missing = [pin for pin in pins if not (cache / pin.filename).is_file()]
    if missing:
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            _apt_download([f"{p.name}:{p.arch}={p.version}" for p in missing], Path(tmp))
            for pin in missing:
                got = Path(tmp) / pin.filename
                if not got.is_file():
                    raise BuildError(f"apt-get download gave no {pin.filename}")
                if _sha256(got.read_bytes()) != pin.sha256:
                    raise BuildError(
                        f"{pin.filename} from the mirror does not match the sha256 "
                        "in the lock: refusing it"
                    )
                os.replace(got, cache / pin.filename)
    paths = []
    for pin in pins:
        path = cache / pin.filename
        if _sha256(path.read_bytes()) != pin.sha256:
            raise BuildError(
                f"cached {path} does not match its pinned sha256: delete it and build again"
            )
        paths.append(path)
    return paths


def relock(lock: Path, cache: Path | None = None) -> list[Pin]:
    """Pin every package of `lock` to apt's current candidate version and its sha256."""
    cache = cache or deb_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    pins = read_lock(lock)
    fresh = []
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _apt_download([f"{p.name}:{p.arch}" for p in pins], Path(tmp))
        for pin in pins:
            # Architecture-independent packages come as NAME_VERSION_all.deb.
            found = sorted(Path(tmp).glob(f"{pin.name}_*.deb"))
            if len(found) != 1:
                raise BuildError(f"apt-get download gave {len(found)} files for {pin.name}")
            data = found[0].read_bytes()
            deb = di.read_deb(data, found[0].name)
            new = Pin(pin.name, deb.version, deb.arch, _sha256(data))
            os.replace(found[0], cache / new.filename)
            fresh.append(new)
    write_lock(lock, fresh)
    return fresh


def load_debs(lock: Path, cache: Path | None = None) -> list[di.Deb]:
    paths = fetch_debs(read_lock(lock), cache)
    # xz decoding dominates a warm build and releases the GIL: use both cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda p: di.read_deb(p.read_bytes(), p.name), paths))


# ---------------------------------------------------------------- trees


def _applets(busybox: bytes, cache: Path) -> list[str]:
    """Applet paths (`bin/sh`, `usr/bin/awk`, ...) as the pinned busybox itself lists them."""
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        exe = Path(tmp) / "busybox"
        exe.write_bytes(busybox)
        exe.chmod(0o755)
        proc = subprocess.run(
            [str(exe), "--list-full"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}
        )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise BuildError(f"busybox --list-full failed: {proc.stderr.strip()}")
    return sorted(set(proc.stdout.split()))


def busybox_tree(cache: Path | None = None) -> Tree:
    cache = cache or deb_cache_dir()
    tree: Tree = {}
    di.install(tree, load_debs(BUSYBOX_LOCK, cache), DOC_FILTER)
    binary = tree.get("bin/busybox")
    if binary is None or binary.kind != "file":
        raise BuildError("busybox-static did not provide bin/busybox")
    for applet in _applets(binary.data, cache):
        path = di.norm_path(applet)
        if path in SKIPPED_APPLETS or path in tree:
            continue
        # Relative targets work both inside the sandbox and in an extracted copy on the host.
        target = posixpath.relpath("bin/busybox", posixpath.dirname(path) or ".")
        di.put(tree, path, di.symlink_entry(target))
    di.put(tree, "sbin/init", di.file_entry(BUSYBOX_INIT.read_bytes(), True))
    for name in (*MOUNT_POINTS, "etc", "root"):
        di.put(tree, name, di.dir_entry())
    di.put(tree, "etc/passwd", di.file_entry(PASSWD.encode()))
    di.put(tree, "etc/group", di.file_entry(GROUP.encode()))
    di.put(tree, "etc/nsswitch.conf", di.file_entry(NSSWITCH.encode()))
    di.put(tree, "etc/hosts", di.file_entry(HOSTS.encode()))
    return tree


def python_tree(cache: Path | None = None) -> Tree:
    cache = cache or deb_cache_dir()
    tree = busybox_tree(cache)
    di.install(tree, load_debs(PYTHON_LOCK, cache), PYTHON_FILTER)
    if "usr/bin/python3.11" not in tree:
        raise BuildError("the python lock did not provide usr/bin/python3.11")
    di.put(tree, "usr/bin/python3", di.symlink_entry("python3.11"))
    return tree


def pkg_install_tree(cache: Path | None = None) -> Tree:
    tree = python_tree(cache)
    engine = ENGINE.read_bytes()
    di.put(tree, "usr/lib/python3/dist-packages/debinstall.py", di.file_entry(engine))
    di.put(tree, "sbin/init", di.file_entry(PKG_INSTALL_INIT.read_bytes(), True))
    return tree


# ---------------------------------------------------------------- tarballs


def _write(tree: Tree, dest: Path, name: str, epoch: int | None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    return di.write_tar(tree, dest / f"{name}.tar.gz", epoch)


def build_busybox(dest: Path, cache: Path | None = None, epoch: int | None = None) -> Path:
    return _write(busybox_tree(cache), dest, "busybox", epoch)


def build_python(dest: Path, cache: Path | None = None, epoch: int | None = None) -> Path:
    return _write(python_tree(cache), dest, "python", epoch)


def build_pkg_install(dest: Path, cache: Path | None = None, epoch: int | None = None) -> Path:
    return _write(pkg_install_tree(cache), dest, "pkg-install", epoch)


def build_empty(dest: Path, cache: Path | None = None, epoch: int | None = None) -> Path:
    """The empty input: a directory with nothing in it (no tarball)."""
    path = dest / "empty"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


BUILDERS: dict[str, Callable[[Path, Path | None, int | None], Path]] = {
    "busybox": build_busybox,
    "empty": build_empty,
    "python": build_python,
    "pkg-install": build_pkg_install,
}
LOCKS: dict[str, list[Path]] = {
    "busybox": [BUSYBOX_LOCK],
    "python": [BUSYBOX_LOCK, PYTHON_LOCK],
    "pkg-install": [BUSYBOX_LOCK, PYTHON_LOCK],
    "empty": [],
}


def build(image: str, dest: Path, cache: Path | None = None, epoch: int | None = None) -> Path:
    if image not in BUILDERS:
        raise BuildError(f"unknown image {image!r}: choose one of {', '.join(IMAGES)}")
    return BUILDERS[image](dest, cache, epoch)


def recipe(image: str, epoch: int | None = None) -> str:
    """A digest of what the image's bytes are made from: its locks, the init scripts, the
    package engine, these builders and the epoch. Another recipe means another build."""
    if image not in BUILDERS:
        raise BuildError(f"unknown image {image!r}: choose one of {', '.join(IMAGES)}")
    digest = hashlib.sha256(
        f"{image}\0{di.source_date_epoch() if epoch is None else epoch}".encode()
    )
    for path in (*LOCKS[image], BUSYBOX_INIT, PKG_INSTALL_INIT, ENGINE, Path(__file__)):
        digest.update(b"\0" + path.read_bytes())
    return digest.hexdigest()
