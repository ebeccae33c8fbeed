#!/usr/bin/python3
"""Install Debian packages into a rootfs tarball, reproducibly.

This one file is both
- the engine of the pkg-install image (its /sbin/init imports it; see examples/README.md for
  the contract `ipfs-execute PKGIMAGE INPUT [install ...]`), and
- the tarball writer the host-side builders in examples/images.py use, so images built on the
  host and images built inside the sandbox come out of the same code.

It needs only the Python 3.11 standard library (the pkg-install image has nothing else).
Archives are read into memory and never extracted to disk: member names from an untrusted
base image or .deb cannot touch the filesystem, they only become keys of a dict.

Reproducibility of every tarball written here: members sorted by name, mtime
SOURCE_DATE_EPOCH (default 315532800), uid/gid 0 and empty owner names, modes normalised
(files 0644 or 0755, directories 0755, symlinks 0777, never setuid/setgid/sticky), GNU tar
format, gzip header with mtime 0 and no file name. Hard links become plain copies, devices
and fifos are dropped (a sandbox rootfs has no use for them).
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import io
import os
import posixpath
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_EPOCH = 315532800  # 1980-01-01, the earliest date zip and many tools accept
GZIP_LEVEL = 6  # gzip's default: level 9 is 5x slower here for 0.7% less
TAR_ENCODING = "utf-8"
MAX_SYMLINK_HOPS = 40  # the kernel's own limit (ELOOP)


class InstallError(Exception):
    """A package, a base image or an option that cannot be used; the message says why."""


@dataclass
class Entry:
    """One filesystem object of a rootfs held in memory."""

    kind: str  # "file", "dir" or "symlink"
    mode: int = 0o755
    data: bytes = b""
    target: str = ""  # symlink target, verbatim (resolved only inside the sandbox)


# Key: normalised path relative to the root ("usr/bin/python3"), never "" or with "./".
Tree = dict[str, Entry]


def source_date_epoch() -> int:
    raw = os.environ.get("SOURCE_DATE_EPOCH", "")
    if not raw:
        return DEFAULT_EPOCH
    try:
        return int(raw)
    except ValueError:
        raise InstallError(f"SOURCE_DATE_EPOCH={raw!r} is not an integer") from None


def norm_path(name: str) -> str:
    """'./usr//bin/' -> 'usr/bin'; refuses names that climb out of the root."""
    if "\0" in name:
        raise InstallError(f"member name with a NUL byte: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InstallError(f"member name climbs out of the root: {name!r}")
    return "/".join(parts)


def file_mode(mode: int) -> int:
    return 0o755 if mode & 0o111 else 0o644


def dir_entry() -> Entry:
    return Entry("dir", 0o755)


def file_entry(data: bytes, executable: bool = False) -> Entry:
    return Entry("file", 0o755 if executable else 0o644, data)


def symlink_entry(target: str) -> Entry:
    return Entry("symlink", 0o777, target=target)


def ensure_parents(tree: Tree, path: str) -> None:
    """Create the missing ancestors of `path` as directories."""
    parent = posixpath.dirname(path)
    missing: list[str] = []
    while parent:
        existing = tree.get(parent)
        if existing is not None:
            if existing.kind != "dir":
                # A member below a symlink or file would make extractors refuse the tarball.
                raise InstallError(
                    f"{path}: its parent /{parent} is a {existing.kind}, not a directory"
                )
            break
        missing.append(parent)
        parent = posixpath.dirname(parent)
    for p in missing:
        tree[p] = dir_entry()


def put(tree: Tree, path: str, entry: Entry) -> None:
    path = norm_path(path)
    if not path:
        raise InstallError("cannot replace the root directory")
    ensure_parents(tree, path)
    tree[path] = entry


# ---------------------------------------------------------------- reading archives

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _decompress_zstd(data: bytes, what: str) -> bytes:
    try:
        import zstandard  # not in the stdlib of 3.11; present on hosts with the project's deps
    except ImportError:
        raise InstallError(
            f"{what} is zstd-compressed, and this Python has no zstandard "
            "module: recompress it with gzip or xz"
        ) from None
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def read_tar(data: bytes, what: str) -> list[tuple[str, Entry]]:
    """Members of a (compressed) tarball as (path, entry), in archive order."""
    if data.startswith(ZSTD_MAGIC):
        data = _decompress_zstd(data, what)
    out: list[tuple[str, Entry]] = []
    seen: dict[str, Entry] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*", encoding=TAR_ENCODING) as tar:
            for member in tar:
                path = norm_path(member.name)
                if not path:
                    continue  # the archive's "./" root entry
                if member.isdir():
                    entry = dir_entry()
                elif member.isreg():
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    entry = Entry("file", file_mode(member.mode), extracted.read())
                elif member.issym():
                    if "\0" in member.linkname:
                        raise InstallError(f"{what}: symlink {path} has a NUL byte")
                    entry = symlink_entry(member.linkname)
                elif member.islnk():
                    target = seen.get(norm_path(member.linkname))
                    if target is None or target.kind != "file":
                        raise InstallError(
                            f"{what}: hard link {path} points to "
                            f"{member.linkname!r}, no earlier regular file"
                        )
                    # A copy, not a link: sorted output may put the link before its target.
                    entry = Entry("file", target.mode, target.data)
                else:
                    log(f"{what}: skipping {path} (device, fifo or other special file)")
                    continue
                seen[path] = entry
                out.append((path, entry))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InstallError(f"{what}: not a readable tar archive ({exc})") from None
    return out


def read_ar(data: bytes, what: str) -> dict[str, bytes]:
    """Members of a Unix `ar` archive (the container of a .deb) by name."""
    if not data.startswith(b"!<arch>\n"):
        raise InstallError(f"{what}: not a .deb (no ar archive signature)")
    members: dict[str, bytes] = {}
    pos = 8
    while pos < len(data):
        header = data[pos : pos + 60]
        if len(header) < 60 or header[58:60] != b"`\n":
            raise InstallError(f"{what}: truncated or corrupt ar header at byte {pos}")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise InstallError(f"{what}: bad member size in ar header at byte {pos}") from None
        start = pos + 60
        if start + size > len(data):
            raise InstallError(f"{what}: member {name} runs past the end of the file")
        members[name] = data[start : start + size]
        pos = start + size + (size & 1)  # members are 2-byte aligned
    return members


@dataclass
class Deb:
    """A Debian binary package, read into memory."""

    source: str  # where it came from, for messages
    control: str  # the control paragraph, verbatim
    fields: dict[str, str]
    members: list[tuple[str, Entry]] = field(repr=False)

    @property
    def name(self) -> str:
        return self.fields.get("Package", "")

    @property
    def version(self) -> str:
        return self.fields.get("Version", "")

    @property
    def arch(self) -> str:
        return self.fields.get("Architecture", "")

    @property
    def list_name(self) -> str:
        # dpkg's naming of /var/lib/dpkg/info files: "pkg:arch" only for Multi-Arch: same.
        if self.fields.get("Multi-Arch") == "same":
            return f"{self.name}:{self.arch}"
        return self.name


def parse_control(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
    return fields


def _single(members: dict[str, bytes], prefix: str, what: str) -> tuple[str, bytes]:
    found = sorted(name for name in members if name == prefix or name.startswith(prefix + "."))
    if len(found) != 1:
        raise InstallError(f"{what}: expected one {prefix}.* member, found {found or 'none'}")
    return found[0], members[found[0]]


def read_deb(data: bytes, source: str) -> Deb:
    members = read_ar(data, source)
    if members.get("debian-binary", b"").strip() != b"2.0":
        raise InstallError(f"{source}: not a Debian 2.0 binary package")
    control_name, control_tar = _single(members, "control.tar", source)
    control_text = ""
    for path, entry in read_tar(control_tar, f"{source}:{control_name}"):
        if path == "control" and entry.kind == "file":
            control_text = entry.data.decode("utf-8", "replace").strip("\n")
    if not control_text:
        raise InstallError(f"{source}: {control_name} has no control file")
    fields = parse_control(control_text)
    if not fields.get("Package") or not fields.get("Version"):
        raise InstallError(f"{source}: control file lacks Package or Version")
    data_name, data_tar = _single(members, "data.tar", source)
    return Deb(source, control_text, fields, read_tar(data_tar, f"{source}:{data_name}"))


def read_rootfs(data: bytes, what: str) -> Tree:
    tree: Tree = {}
    for path, entry in read_tar(data, what):
        existing = tree.get(path)
        if entry.kind == "dir" and existing is not None and existing.kind == "dir":
            continue
        put(tree, path, entry)
    return tree


# ---------------------------------------------------------------- installing


def _join_clamped(base: list[str], target: str) -> list[str]:
    """Components of `target` relative to `base`, with '..' stopping at the root (chroot-like)."""
    parts = [] if target.startswith("/") else list(base)
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
        else:
            parts.append(comp)
    return parts


def resolve_parents(tree: Tree, path: str) -> str:
    """Follow symlinks among the ancestors of `path` inside the tree, as dpkg does on disk.

    A base with a merged /usr (bin -> usr/bin) then receives a package's ./bin/foo at
    usr/bin/foo instead of failing on the symlink. The last component is not followed.
    """
    parts = path.split("/")
    todo, last = parts[:-1], parts[-1]
    done: list[str] = []
    hops = 0
    while todo:
        comp = todo.pop(0)
        entry = tree.get("/".join([*done, comp]))
        if entry is not None and entry.kind == "symlink":
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise InstallError(f"/{path}: too many levels of symbolic links")
            todo = _join_clamped(done, entry.target) + todo
            done = []
        else:
            done.append(comp)
    return "/".join([*done, last])


@dataclass(frozen=True)
class PathFilter:
    """dpkg-style --path-exclude / --path-include globs, matched against '/path'."""

    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()

    def keeps(self, path: str) -> bool:
        slashed = "/" + path
        if not any(fnmatch.fnmatchcase(slashed, pat) for pat in self.exclude):
            return True
        return any(fnmatch.fnmatchcase(slashed, pat) for pat in self.include)


def install(tree: Tree, debs: list[Deb], path_filter: PathFilter = PathFilter()) -> None:
    """Unpack `debs` into `tree` in the order given; no maintainer scripts run.

    Packages may replace files of the base. Two of the given packages shipping different
    contents at the same path is an error (dpkg refuses that too); identical contents, as in
    Multi-Arch: same packages, are fine.
    """
    owner: dict[str, str] = {}
    for deb in debs:
        listed: set[str] = set()
        for path, entry in deb.members:
            if not path_filter.keeps(path):
                continue
            dest = resolve_parents(tree, path)
            existing = tree.get(dest)
            if entry.kind == "dir":
                if existing is None:
                    put(tree, dest, entry)
                elif existing.kind == "file":
                    raise InstallError(
                        f"{deb.source}: directory /{path} would replace a file of the same name"
                    )
                # An existing directory, or a symlink to one, stays as it is (like dpkg).
            else:
                if existing is not None and existing.kind == "dir":
                    raise InstallError(f"{deb.source}: /{path} would replace a directory")
                previous = owner.get(dest)
                if previous and previous != deb.name and existing != entry:
                    raise InstallError(
                        f"{deb.source}: /{path} is also in package {previous}, with other contents"
                    )
                put(tree, dest, entry)
                owner[dest] = deb.name
            listed.add("/" + path)
        _record(tree, deb, listed)


def _record(tree: Tree, deb: Deb, listed: set[str]) -> None:
    """Make the package visible to dpkg-aware tools: status paragraph and file list."""
    status_path = "var/lib/dpkg/status"
    paragraphs: dict[str, str] = {}
    existing = tree.get(status_path)
    if existing is not None and existing.kind == "file":
        for para in existing.data.decode("utf-8", "replace").split("\n\n"):
            fields = parse_control(para)
            if fields.get("Package"):
                key = f"{fields['Package']}:{fields.get('Architecture', '')}"
                paragraphs[key] = para.strip("\n")
    lines = deb.control.split("\n")
    # Unpacked, never configured: no maintainer script ran, and the status says so.
    para = "\n".join(
        lines[:1]
        + ["Status: install ok unpacked"]
        + [ln for ln in lines[1:] if not ln.startswith("Status:")]
    )
    paragraphs[f"{deb.name}:{deb.arch}"] = para
    text = "\n\n".join(paragraphs[k] for k in sorted(paragraphs)) + "\n"
    put(tree, status_path, file_entry(text.encode()))
    file_list = "/.\n" + "".join(p + "\n" for p in sorted(listed))
    put(tree, f"var/lib/dpkg/info/{deb.list_name}.list", file_entry(file_list.encode()))


# ---------------------------------------------------------------- writing


def write_tar(tree: Tree, dest: Path, epoch: int | None = None, level: int = GZIP_LEVEL) -> Path:
    """Write `tree` as a reproducible .tar.gz at `dest` (atomically) and return `dest`."""
    epoch = source_date_epoch() if epoch is None else epoch
    tree = dict(tree)
    for path in list(tree):
        ensure_parents(tree, path)  # every directory gets its own member
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        # filename="" keeps the temporary name out of the gzip header; mtime=0 the clock.
        with (
            open(tmp, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=level) as gz,
            tarfile.open(
                fileobj=gz, mode="w", format=tarfile.GNU_FORMAT, encoding=TAR_ENCODING
            ) as tar,
        ):
            for path in sorted(tree, key=lambda p: p.encode(TAR_ENCODING, "surrogateescape")):
                _add_member(tar, path, tree[path], epoch)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _add_member(tar: tarfile.TarFile, path: str, entry: Entry, epoch: int) -> None:
    info = tarfile.TarInfo(path)
    info.mtime = epoch
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.kind == "dir":
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    elif entry.kind == "symlink":
        info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, entry.target
        tar.addfile(info)
    elif entry.kind == "file":
        info.type, info.mode, info.size = tarfile.REGTYPE, file_mode(entry.mode), len(entry.data)
        tar.addfile(info, io.BytesIO(entry.data))
    else:
        raise InstallError(f"/{path}: unknown entry kind {entry.kind!r}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the image's command line

BASE_NAMES = ("rootfs.tar.gz", "rootfs.tar.xz", "rootfs.tar.bz2", "rootfs.tar")
SUBCOMMANDS = ("install", "list")


def log(message: str) -> None:
    print(f"pkg-install: {message}", file=sys.stderr, flush=True)


def _find_debs(explicit: list[str], packages_dir: Path) -> list[Path]:
    if explicit:
        return [Path(p) for p in explicit]
    if not packages_dir.is_dir():
        return []
    # Sorted file names: the install order must not depend on readdir order.
    return sorted(
        (p for p in packages_dir.iterdir() if p.name.endswith(".deb")), key=lambda p: p.name
    )


def _find_base(option: str | None, input_dir: Path) -> Path:
    if option:
        return Path(option)
    for name in BASE_NAMES:
        if (input_dir / name).is_file():
            return input_dir / name
    raise InstallError(
        f"no base image: put one of {', '.join(BASE_NAMES)} in {input_dir} "
        "(or pass --base PATH, or --no-base to start from an empty root)"
    )


def _install_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="/sbin/init [install]",
        description="Install .deb packages into a base rootfs tarball and write a reproducible "
        "rootfs.tar.gz. No maintainer scripts run. Any other first argument is run "
        "as a command (e.g. `sh -c ...`, `python3 script.py`); `list` prints the "
        "packages found.",
    )
    parser.add_argument(
        "debs",
        nargs="*",
        metavar="DEB",
        help="packages to install, in this order "
        "(default: INPUT/packages/*.deb sorted by file name)",
    )
    parser.add_argument("--input", default="/input", help="input directory (default /input)")
    parser.add_argument(
        "--base",
        help="base rootfs tarball (default: INPUT/rootfs.tar.gz, then .tar.xz, .tar.bz2, .tar)",
    )
    parser.add_argument(
        "--no-base", action="store_true", help="start from an empty root instead of a base image"
    )
    parser.add_argument("--packages", help="directory of .deb files (default INPUT/packages)")
    parser.add_argument(
        "--output",
        default="/output/rootfs.tar.gz",
        help="where to write the result (default /output/rootfs.tar.gz)",
    )
    parser.add_argument(
        "--path-exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="skip package paths matching GLOB (dpkg syntax, e.g. '/usr/share/doc/*'); repeatable",
    )
    parser.add_argument(
        "--path-include",
        action="append",
        default=[],
        metavar="GLOB",
        help="keep paths matching GLOB even when excluded; repeatable",
    )
    return parser


def cmd_install(argv: list[str]) -> int:
    args = _install_parser().parse_args(argv)
    input_dir = Path(args.input)
    epoch = source_date_epoch()
    tree: Tree = {}
    if not args.no_base:
        base = _find_base(args.base, input_dir)
        tree = read_rootfs(base.read_bytes(), str(base))
        log(f"base {base}: {len(tree)} entries")
    packages_dir = Path(args.packages) if args.packages else input_dir / "packages"
    deb_paths = _find_debs(args.debs, packages_dir)
    if not deb_paths:
        log(f"no packages in {packages_dir}: the output is the base, normalised")
    debs = []
    for path in deb_paths:
        deb = read_deb(path.read_bytes(), path.name)
        log(f"unpacking {deb.name} {deb.version} ({deb.arch}) from {path.name}")
        debs.append(deb)
    install(tree, debs, PathFilter(tuple(args.path_exclude), tuple(args.path_include)))
    output = write_tar(tree, Path(args.output), epoch)
    log(f"wrote {output}: {len(tree)} entries, sha256 {sha256_file(output)}")
    return 0


def cmd_list(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="/sbin/init list", description="Print name=version arch of each package."
    )
    parser.add_argument("--packages", default="/input/packages")
    parser.add_argument("debs", nargs="*", metavar="DEB")
    args = parser.parse_args(argv)
    for path in _find_debs(args.debs, Path(args.packages)):
        deb = read_deb(path.read_bytes(), path.name)
        print(f"{deb.name}={deb.version} {deb.arch} {path.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if not args or args[0].startswith("-"):
            return cmd_install(args)
        if args[0] == "install":
            return cmd_install(args[1:])
        if args[0] == "list":
            return cmd_list(args[1:])
    except InstallError as exc:
        log(f"error: {exc}")
        return 1
    except OSError as exc:
        log(f"error: {exc}")
        return 1
    # Anything else is a command, as in the busybox and python images.
    try:
        os.execvp(args[0], args)
    except OSError as exc:
        log(f"cannot run {args[0]!r}: {exc}")
        return 127
    return 0  # not reached: execvp replaces this process


if __name__ == "__main__":
    raise SystemExit(main())
