"""Safe extraction: a corpus of hostile archives, and real trees in every supported format."""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
import tarfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipfs_execute_magic import archive
from ipfs_execute_magic.archive import ArchiveLimits, extract, sniff_compression
from ipfs_execute_magic.errors import BadRootfsError, StagingError, UnsafeArchiveError

# --- building archives member by member ------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes | None]


def regular(name: str, data: bytes = b"data", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def directory(name: str, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    return info, None


def symlink(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, None


def hardlink(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    return info, None


def special(name: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
    return info, None


def with_pax(member: Member, **headers: str) -> Member:
    info, data = member
    info.pax_headers = dict(headers)
    return info, data


def tar_bytes(*members: Member, fmt: int = tarfile.PAX_FORMAT, end_marker: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    if not end_marker:
        raw = raw.rstrip(b"\0")
        raw += bytes(-len(raw) % 512)
    return raw


@dataclass(frozen=True)
class Host:
    dest: Path
    outside: Path  # a directory beside dest that no archive may change

    def snapshot(self) -> list[tuple[str, int, int, bytes]]:
        entries = []
        for path in sorted(self.outside.rglob("*")):
            st = path.lstat()
            content = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            entries.append((str(path), st.st_mode, st.st_nlink, content))
        return entries


@pytest.fixture
def host(tmp_path: Path) -> Host:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"host data")
    dest = tmp_path / "dest"
    dest.mkdir()
    return Host(dest, outside)


def run(data: bytes, dest: Path, **kwargs: object) -> archive.ExtractStats:
    return extract(io.BytesIO(data), dest, name="bafytestcid", **kwargs)  # type: ignore[arg-type]


def assert_refused(
    host: Host, data: bytes, member: str, reason: str = "", **kwargs: object
) -> None:
    before = host.snapshot()
    with pytest.raises(UnsafeArchiveError) as caught:
        run(data, host.dest, **kwargs)
    assert caught.value.member == member
    assert reason in caught.value.reason
    assert "bafytestcid" in str(caught.value) and repr(member) in str(caught.value)
    assert host.snapshot() == before


# --- hostile archives ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../escape", "a/../../escape", "./../escape", "/../escape", "a/b/../c"]
)
def test_dotdot_is_refused(host: Host, name: str) -> None:
    assert_refused(host, tar_bytes(directory("a"), regular(name)), name, "'..'")
    assert not (host.dest.parent / "escape").exists()


def test_absolute_paths_land_inside_dest(host: Host) -> None:
    target = host.outside / "evil"
    run(tar_bytes(regular(str(target), b"inside"), regular("/etc/hostname-test", b"x")), host.dest)
    assert not target.exists()
    assert (host.dest / str(target).lstrip("/")).read_bytes() == b"inside"
    assert (host.dest / "etc/hostname-test").is_file()


@pytest.mark.parametrize("target_kind", ["absolute", "relative", "missing"])
def test_write_through_symlink_is_refused(host: Host, target_kind: str) -> None:
    missing = Path(f"/tmp/ipfs-execute-test-{uuid.uuid4().hex}")
    target = {
        "absolute": str(host.outside),
        "relative": "../outside",
        "missing": str(missing),
    }[target_kind]
    data = tar_bytes(symlink("a", target), regular("a/evil", b"pwned"))
    assert_refused(host, data, "a/evil", "symlink")
    assert not missing.exists()
    assert os.readlink(host.dest / "a") == target  # stored verbatim, never followed


def test_symlink_chain_in_parent_is_refused(host: Host) -> None:
    data = tar_bytes(symlink("x", "y"), symlink("y", str(host.outside)), directory("x/sub"))
    assert_refused(host, data, "x/sub", "symlink")


def test_directory_member_through_symlink_is_refused(host: Host) -> None:
    data = tar_bytes(symlink("d", str(host.outside)), directory("d/new"), regular("d/new/f"))
    assert_refused(host, data, "d/new", "symlink")


def test_hardlink_through_symlinked_dir_is_refused(host: Host) -> None:
    link_via_symlink = tar_bytes(symlink("d", str(host.outside)), hardlink("stolen", "d/keep"))
    assert_refused(host, link_via_symlink, "stolen", "symlink")
    assert not (host.dest / "stolen").exists()


def test_hardlink_created_inside_symlinked_dir_is_refused(host: Host) -> None:
    data = tar_bytes(
        regular("f", b"mine"), symlink("d", str(host.outside)), hardlink("d/planted", "f")
    )
    assert_refused(host, data, "d/planted", "symlink")
    assert not (host.outside / "planted").exists()


def _deep_chain(levels: int = 16) -> tuple[list[Member], str]:
    """The idea of CVE-2025-4517: nested directories with 247-character names make the real path
    longer than PATH_MAX, so a checker that resolves paths with realpath() stops resolving and
    believes an escaping symlink stays inside. Returns the members and the short path (through
    symlinks) of the deepest directory."""
    long = "d" * 247
    members: list[Member] = []
    real = ""
    for step in "abcdefghijklmnop"[:levels]:
        members.append(directory(real + long))
        members.append(symlink(real + step, long))
        real += long + "/"
    members.append(symlink(real + "up", "../" * (levels + 6)))
    return members, "/".join("abcdefghijklmnop"[:levels])


@pytest.mark.parametrize("final", ["file", "hardlink", "dir", "via-short-path"])
def test_cve_2025_4517_style_chain(host: Host, final: str) -> None:
    members, short = _deep_chain()
    long_path = ("d" * 247 + "/") * 16
    members.append(symlink("escape", long_path + "up" + str(host.outside)))
    escaping = {
        "file": regular("escape/pwned", b"pwned"),
        "hardlink": hardlink("stolen", "escape/keep"),
        "dir": directory("escape/newdir"),
        "via-short-path": regular(short + "/up/" + str(host.outside).lstrip("/") + "/pwned"),
    }[final]
    members.append(escaping)
    assert_refused(host, tar_bytes(*members), escaping[0].name, "symlink")


def test_deep_chain_itself_is_extracted_verbatim(host: Host) -> None:
    members, _ = _deep_chain()
    run(tar_bytes(*members, regular(("d" * 247 + "/") * 16 + "deep.txt", b"deep")), host.dest)
    deepest = ("d" * 247 + "/") * 16
    fd = os.open(host.dest, os.O_RDONLY)
    try:
        for component in deepest.strip("/").split("/"):  # the path is longer than PATH_MAX
            new_fd = os.open(component, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = new_fd
        assert os.readlink("up", dir_fd=fd) == "../" * 22
        with open(os.open("deep.txt", os.O_RDONLY, dir_fd=fd), "rb") as handle:
            assert handle.read() == b"deep"
    finally:
        os.close(fd)


@pytest.mark.parametrize("target", ["/etc/passwd", "etc/passwd", "./etc/passwd"])
def test_hardlink_to_host_file_is_refused(host: Host, target: str) -> None:
    links_before = os.stat("/etc/passwd").st_nlink
    assert_refused(
        host, tar_bytes(hardlink("passwd", target)), "passwd", "not a file extracted before it"
    )
    assert os.stat("/etc/passwd").st_nlink == links_before
    assert not (host.dest / "passwd").exists()


def test_hardlink_out_of_tree_with_dotdot_is_refused(host: Host) -> None:
    assert_refused(host, tar_bytes(hardlink("keep", "../outside/keep")), "keep", "'..'")


def test_hardlink_to_later_member_is_refused(host: Host) -> None:
    data = tar_bytes(hardlink("early", "later"), regular("later", b"later"))
    assert_refused(host, data, "early", "not a file extracted before it")


@pytest.mark.parametrize("target_member", [symlink("s", "/etc/passwd"), directory("dir")])
def test_hardlink_to_symlink_or_dir_is_refused(host: Host, target_member: Member) -> None:
    data = tar_bytes(target_member, hardlink("link", target_member[0].name))
    assert_refused(host, data, "link", "not a regular file")


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
        (tarfile.FIFOTYPE, "fifo"),
    ],
)
def test_special_files_are_refused(host: Host, kind: bytes, words: str) -> None:
    assert_refused(host, tar_bytes(directory("dev"), special("dev/node", kind)), "dev/node", words)
    assert not os.path.lexists(host.dest / "dev/node")


def test_setid_and_sticky_bits_are_dropped_and_recorded(host: Host) -> None:
    data = tar_bytes(
        regular("usr/bin/sudo", b"#!", mode=0o4755),
        regular("usr/bin/wall", b"#!", mode=0o2755),
        directory("tmp", mode=0o1777),
        directory("var/mail", mode=0o2775),
        regular("plain", mode=0o600),
    )
    stats = run(data, host.dest)
    assert set(stats.stripped_setid) == {"usr/bin/sudo", "usr/bin/wall", "tmp", "var/mail"}
    modes = {
        name: stat.S_IMODE((host.dest / name).stat().st_mode)
        for name in ("usr/bin/sudo", "usr/bin/wall", "tmp", "var/mail", "plain")
    }
    assert modes == {
        "usr/bin/sudo": 0o755,
        "usr/bin/wall": 0o755,
        "tmp": 0o755,
        "var/mail": 0o755,
        "plain": 0o644,
    }


def test_nul_in_names_is_refused(host: Host) -> None:
    data = tar_bytes(with_pax(regular("placeholder"), path="ok\0evil"))
    assert_refused(host, data, "ok\0evil", "NUL")
    data = tar_bytes(with_pax(symlink("link", "placeholder"), linkpath="/etc\0/passwd"))
    assert_refused(host, data, "link", "NUL")
    data = tar_bytes(with_pax(hardlink("hl", "placeholder"), linkpath="a\0b"))
    assert_refused(host, data, "hl", "NUL")


def test_member_count_bound(host: Host) -> None:
    data = tar_bytes(*(regular(f"f{i}") for i in range(5)))
    assert_refused(host, data, "f3", "limit of 3", limits=ArchiveLimits(max_members=3))


def test_total_bytes_bound(host: Host) -> None:
    data = tar_bytes(regular("a", bytes(600)), regular("b", bytes(600)))
    assert_refused(
        host, data, "b", "limit of 1000 bytes", limits=ArchiveLimits(max_total_bytes=1000)
    )


def test_member_bytes_bound(host: Host) -> None:
    data = tar_bytes(regular("small", bytes(50)), regular("big", bytes(200)))
    assert_refused(host, data, "big", "per file", limits=ArchiveLimits(max_member_bytes=100))
    assert not (host.dest / "big").exists()


def test_declared_size_bound_needs_no_data(host: Host) -> None:
    # A header may claim any size; the bound is checked before a byte of it is read.
    info = tarfile.TarInfo("huge")
    info.size = 20 * 1024**3
    header = info.tobuf(tarfile.GNU_FORMAT)
    assert_refused(host, header, "huge", "per file")


def test_oversized_extended_header_is_refused(host: Host) -> None:
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = 64 * 1024**2  # a long name the parser would have to hold in memory
    with pytest.raises(UnsafeArchiveError, match="extended header"):
        run(info.tobuf(tarfile.GNU_FORMAT) + bytes(1024), host.dest)


def test_long_chain_of_extended_headers(host: Host) -> None:
    chain = []
    for i in range(1500):
        info = tarfile.TarInfo("././@LongLink")
        info.type = tarfile.GNUTYPE_LONGNAME
        info.size = 12
        chain.append(info.tobuf(tarfile.GNU_FORMAT) + b"name%06d\0\0" % i + bytes(500))
    data = b"".join(chain) + tar_bytes(regular("x"))
    with pytest.raises(BadRootfsError, match="chained extended headers"):
        run(data, host.dest)


def test_duplicate_file_names_replace_without_following_symlinks(host: Host) -> None:
    data = tar_bytes(
        regular("a", b"first"),
        symlink("a", str(host.outside / "keep")),
        regular("a", b"second"),
        symlink("l", str(host.outside / "keep")),
        hardlink("l", "a"),
    )
    before = host.snapshot()
    run(data, host.dest)
    assert host.snapshot() == before
    assert (host.dest / "a").read_bytes() == b"second"
    assert not (host.dest / "a").is_symlink()
    assert (host.dest / "l").stat().st_ino == (host.dest / "a").stat().st_ino


def test_duplicate_name_replacing_a_directory_is_refused(host: Host) -> None:
    data = tar_bytes(directory("d"), regular("d/inner"), regular("d", b"flat"))
    assert_refused(host, data, "d", "directory")
    assert (host.dest / "d/inner").is_file()


def test_directory_replaces_file_or_symlink(host: Host) -> None:
    data = tar_bytes(
        regular("x"),
        directory("x"),
        symlink("y", str(host.outside)),
        directory("y"),
        regular("y/inside"),
    )
    run(data, host.dest)
    assert (host.dest / "x").is_dir()
    assert (host.dest / "y").is_dir() and not (host.dest / "y").is_symlink()
    assert not (host.outside / "inside").exists()


def test_member_replacing_dest_itself_is_refused(host: Host) -> None:
    assert_refused(host, tar_bytes(symlink("./", "/")), "./", "destination directory itself")


# --- real trees ------------------------------------------------------------------------------

LONG_COMPONENT = "n" * 120  # beyond the 100-byte ustar name field


def make_rootfs(root: Path) -> None:
    root.mkdir()
    for sub in (
        "usr/bin",
        "usr/lib/x86_64-linux-gnu/deep/er",
        "etc/alternatives",
        "var/empty",
        "usr/share/" + LONG_COMPONENT,
        "usr/share/unicode",
    ):
        (root / sub).mkdir(parents=True)
    big = (bytes(range(256)) * 20480)[: 5 * 1024 * 1024 - 3]
    (root / "usr/bin/python3").write_bytes(big)
    os.chmod(root / "usr/bin/python3", 0o755)
    os.link(root / "usr/bin/python3", root / "usr/bin/python3.11")
    (root / "bin").symlink_to("usr/bin")
    (root / "etc/alternatives/editor").symlink_to("/usr/bin/vim")
    (root / "usr/bin/py").symlink_to("python3")
    (root / "etc/empty").write_bytes(b"")
    (root / "etc/shadow").write_bytes(b"root:*:1::::::\n")
    os.chmod(root / "etc/shadow", 0o640)
    (root / "usr/lib/x86_64-linux-gnu/deep/er/libz.so.1").write_bytes(b"\x7fELF" + bytes(1000))
    (root / "usr/share" / LONG_COMPONENT / ("m" * 150 + ".txt")).write_bytes(b"long name")
    (root / "usr/share/unicode/caf\u00e9-\u65e5\u672c.txt").write_bytes(b"unicode")
    (root / "proc").mkdir(mode=0o555)
    os.chmod(root / "proc", 0o555)
    (root / "root").mkdir()
    os.chmod(root / "root", 0o700)
    for i in range(50):
        (root / "usr/lib" / f"mod{i}.py").write_bytes(b"print(%d)\n" % i * (i + 1))


def expected_mode(st: os.stat_result) -> int:
    mode = stat.S_IMODE(st.st_mode) & 0o755
    return mode | (0o555 if stat.S_ISDIR(st.st_mode) else 0o444)


def assert_same_tree(source: Path, extracted: Path) -> None:
    def listing(root: Path) -> dict[str, os.stat_result]:
        entries = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for entry in dirnames + filenames:
                path = Path(dirpath, entry)
                entries[str(path.relative_to(root))] = path.lstat()
        return entries

    want, got = listing(source), listing(extracted)
    assert sorted(got) == sorted(want)
    for rel, st in want.items():
        found = got[rel]
        assert stat.S_IFMT(found.st_mode) == stat.S_IFMT(st.st_mode), rel
        if stat.S_ISLNK(st.st_mode):
            assert os.readlink(extracted / rel) == os.readlink(source / rel)
            continue
        assert stat.S_IMODE(found.st_mode) == expected_mode(st), rel
        if stat.S_ISREG(st.st_mode):
            assert (extracted / rel).read_bytes() == (source / rel).read_bytes(), rel
    assert got["usr/bin/python3"].st_ino == got["usr/bin/python3.11"].st_ino


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rootfs") / "tree"
    make_rootfs(root)
    return root


def _python_tar(root: Path, fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.add(root, arcname=".")
    return buf.getvalue()


def _gnu_tar(root: Path, *flags: str) -> bytes:
    return subprocess.run(
        ["tar", "-C", str(root), *flags, "-cf", "-", "."], check=True, stdout=subprocess.PIPE
    ).stdout


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress(data)


ARCHIVES = {
    "pax-plain": lambda root: _python_tar(root, tarfile.PAX_FORMAT),
    "gnu-gzip": lambda root: gzip.compress(_python_tar(root, tarfile.GNU_FORMAT), compresslevel=1),
    "gnu-tar-gzip": lambda root: _gnu_tar(root, "-z"),
    "gnu-tar-posix-zstd": lambda root: _zstd(_gnu_tar(root, "--format=posix")),
    "gnu-zstd": lambda root: _zstd(_python_tar(root, tarfile.GNU_FORMAT)),
}


@pytest.mark.parametrize("kind", sorted(ARCHIVES))
def test_rootfs_tree_round_trip(rootfs: Path, tmp_path: Path, kind: str) -> None:
    data = ARCHIVES[kind](rootfs)
    dest = tmp_path / "dest"
    dest.mkdir()
    stats = run(data, dest)
    assert_same_tree(rootfs, dest)
    assert stats.files == 56 and stats.hardlinks == 1 and stats.symlinks == 3
    assert stats.bytes >= 5 * 1024 * 1024


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_rootfs_from_a_pipe(rootfs: Path, tmp_path: Path, compression: str) -> None:
    """A non-seekable stream, through each decompressor."""
    path = tmp_path / "rootfs.tar.x"
    if compression == "gzip":
        path.write_bytes(_gnu_tar(rootfs, "-z"))
    else:
        path.write_bytes(_zstd(_gnu_tar(rootfs)))
    with subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE) as cat:
        assert cat.stdout is not None
        dest = tmp_path / "dest"
        dest.mkdir()
        extract(cat.stdout, dest, name=compression)
    assert_same_tree(rootfs, dest)


def _members_seen(
    data: bytes, dest: Path, monkeypatch: pytest.MonkeyPatch, *, tarfile_only: bool
) -> list[tuple]:
    seen: list[tuple] = []
    real_add = archive._TreeWriter.add

    def record(
        self: archive._TreeWriter,
        name: str,
        kind: bytes,
        mode: int,
        size: int,
        linkname: str,
        reader: object,
        **extra: object,
    ) -> None:
        seen.append((name, kind, mode, size, linkname))
        real_add(self, name, kind, mode, size, linkname, reader, **extra)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(archive._TreeWriter, "add", record)
        if tarfile_only:
            patch.setattr(archive, "_parse_plain_member", lambda reader: None)
        dest.mkdir()
        run(data, dest)
    return seen


def _odd_headers() -> bytes:
    v7_dir = tarfile.TarInfo("olddir/")
    v7_dir.type = tarfile.AREGTYPE
    prefixed = regular("p" * 80 + "/" + "q" * 60, b"prefix")
    binary = with_pax(regular("placeholder", b"binary"), path="caf\udce9-bin", hdrcharset="BINARY")
    sized = with_pax(regular("sized", b"12345"), size="5", comment="ignored")
    return b"".join(
        [
            tar_bytes(directory("pdir"), (v7_dir, None), fmt=tarfile.GNU_FORMAT, end_marker=False),
            tar_bytes(directory("p" * 80), prefixed, fmt=tarfile.USTAR_FORMAT, end_marker=False),
            tar_bytes(
                binary,
                sized,
                with_pax(symlink("l", "x"), linkpath="t" * 300),
                directory("hard"),
                with_pax(hardlink("h", "sized"), path="hard/link"),
            ),
        ]
    )


def test_fast_header_parsing_agrees_with_tarfile(
    rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archives = {
        "gnu": _gnu_tar(rootfs, "--format=gnu"),
        "posix": _gnu_tar(rootfs, "--format=posix"),
        "pax": _python_tar(rootfs, tarfile.PAX_FORMAT),
        "odd": _odd_headers(),
    }
    fast_hits = {"n": 0}
    real_fast = archive._parse_plain_member

    def counting(reader: archive._StreamReader) -> object:
        result = real_fast(reader)
        fast_hits["n"] += result is not None
        return result

    for label, data in archives.items():
        fast_hits["n"] = 0
        monkeypatch.setattr(archive, "_parse_plain_member", counting)
        fast = _members_seen(data, tmp_path / f"{label}-fast", monkeypatch, tarfile_only=False)
        monkeypatch.undo()
        slow = _members_seen(data, tmp_path / f"{label}-slow", monkeypatch, tarfile_only=True)
        assert fast == slow, label
        if label != "odd":
            assert fast_hits["n"] >= len(fast) - 3, label  # nearly every member took the fast path


def test_gzip_with_several_members(tmp_path: Path) -> None:
    raw = tar_bytes(regular("a", b"A" * 5000), regular("b", b"B" * 70000))
    data = gzip.compress(raw[:4096]) + gzip.compress(raw[4096:]) + bytes(100)  # trailing padding
    dest = tmp_path / "dest"
    dest.mkdir()
    run(data, dest)
    assert (dest / "a").read_bytes() == b"A" * 5000 and (dest / "b").read_bytes() == b"B" * 70000


def test_sparse_files_from_gnu_tar(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    sparse = source / "sparse.img"
    with open(sparse, "wb") as handle:
        handle.seek(3 * 1024 * 1024)
        handle.write(b"middle")
        handle.seek(7 * 1024 * 1024)
        handle.write(b"end" * 1000)
    for fmt in ("gnu", "posix"):
        dest = tmp_path / f"dest-{fmt}"
        dest.mkdir()
        run(_gnu_tar(source, "--sparse", f"--format={fmt}"), dest)
        assert (dest / "sparse.img").read_bytes() == sparse.read_bytes()


def test_non_utf8_names_keep_their_bytes(tmp_path: Path) -> None:
    info = tarfile.TarInfo("caf\udce9")  # latin-1 'é' as tarfile decodes it
    data = tar_bytes((info, b""), fmt=tarfile.GNU_FORMAT)
    assert b"caf\xe9" in data
    dest = tmp_path / "dest"
    dest.mkdir()
    run(data, dest)
    assert os.listdir(bytes(dest)) == [b"caf\xe9"]


def test_deep_paths_and_no_fd_leak(tmp_path: Path) -> None:
    deep = "/".join(["p"] * 150)
    data = tar_bytes(
        regular(deep + "/leaf", b"x"),
        regular(deep + "/leaf2"),
        hardlink("top", deep + "/leaf"),
        *(regular(f"dir{i}/f") for i in range(archive.MAX_CACHED_DIRS + 10)),
    )
    fds_before = len(os.listdir("/proc/self/fd"))
    dest = tmp_path / "dest"
    dest.mkdir()
    run(data, dest)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert (dest / deep / "leaf").read_bytes() == b"x"
    assert (dest / "top").stat().st_ino == (dest / deep / "leaf").stat().st_ino


def test_read_only_directory_modes_are_applied_last(tmp_path: Path) -> None:
    data = tar_bytes(
        directory("ro", mode=0o555),
        regular("ro/f"),
        directory("ro/sub", mode=0o500),
        regular("ro/sub/g"),
        directory(".", mode=0o555),
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    run(data, dest)
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o555
    assert stat.S_IMODE((dest / "ro/sub").stat().st_mode) == 0o555
    assert stat.S_IMODE(dest.stat().st_mode) == 0o555
    assert (dest / "ro/sub/g").is_file()
    os.chmod(dest, 0o755)


def test_existing_directories_are_updated(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    run(tar_bytes(directory("etc", 0o700), regular("etc/a", b"1")), dest)
    run(tar_bytes(directory("etc", 0o755), regular("etc/a", b"2"), regular("etc/b")), dest)
    assert (dest / "etc/a").read_bytes() == b"2" and (dest / "etc/b").exists()
    assert stat.S_IMODE((dest / "etc").stat().st_mode) == 0o755


def test_implicit_parent_directories_are_created(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    stats = run(tar_bytes(regular("a/b/c/file", b"x"), symlink("a/b/link", "c/file")), dest)
    assert (dest / "a/b/link").read_bytes() == b"x"
    assert stat.S_IMODE((dest / "a/b").stat().st_mode) == 0o755
    assert (stats.members, stats.files, stats.symlinks, stats.dirs) == (2, 1, 1, 0)


# --- broken streams --------------------------------------------------------------------------


def test_sniff_compression() -> None:
    assert sniff_compression(b"\x1f\x8b\x08\x00") == "gzip"
    assert sniff_compression(b"\x28\xb5\x2f\xfd\x00") == "zstd"
    assert sniff_compression(tar_bytes(regular("a"))[:512]) == "tar"
    assert sniff_compression(tar_bytes(regular("a"), fmt=tarfile.GNU_FORMAT)[:512]) == "tar"
    assert sniff_compression(bytes(512)) == "tar"
    assert sniff_compression(b"\xfd7zXZ\x00" + bytes(600)) is None
    assert sniff_compression(b"hello world\n") is None
    assert sniff_compression(b"") is None


@pytest.mark.parametrize("data", [b"", b"#!/bin/sh\necho hi\n" * 50, b"\xfd7zXZ\x00" + bytes(1000)])
def test_not_an_archive(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(
        BadRootfsError, match=r"bafytestcid is not a \.tar, \.tar\.gz or \.tar\.zst archive"
    ):
        run(data, tmp_path)


@pytest.fixture
def big_tar() -> bytes:
    return tar_bytes(*(regular(f"f{i}", os.urandom(20000)) for i in range(20)))


def test_truncated_gzip(tmp_path: Path, big_tar: bytes) -> None:
    data = gzip.compress(big_tar)
    with pytest.raises(BadRootfsError, match="bafytestcid is corrupt or truncated"):
        run(data[: len(data) // 2], tmp_path)


def test_corrupt_gzip(tmp_path: Path, big_tar: bytes) -> None:
    data = bytearray(gzip.compress(big_tar))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    with pytest.raises(BadRootfsError, match="corrupt or truncated"):
        run(bytes(data), tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_broken_zstd(tmp_path: Path, big_tar: bytes, damage: str) -> None:
    data = bytearray(_zstd(big_tar))
    if damage == "truncated":
        del data[len(data) - 100 :]
    else:
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    with pytest.raises(BadRootfsError, match="bafytestcid is corrupt or truncated"):
        run(bytes(data), tmp_path)


def test_truncated_plain_tar_inside_a_member(tmp_path: Path, big_tar: bytes) -> None:
    with pytest.raises(BadRootfsError, match="corrupt or truncated"):
        run(big_tar[:100_000], tmp_path)


def test_garbage_header_in_the_middle(tmp_path: Path) -> None:
    data = bytearray(tar_bytes(regular("a", b"x" * 600), regular("b")))
    data[1536 : 1536 + 100] = b"\xff" * 100  # the header of "b"
    with pytest.raises(BadRootfsError, match="bad tar header at byte 1536"):
        run(bytes(data), tmp_path)


def test_end_marker_required(tmp_path: Path, big_tar: bytes) -> None:
    complete = tar_bytes(regular("a"), regular("b"))
    no_marker = tar_bytes(regular("a"), regular("b"), end_marker=False)
    dest = tmp_path / "ok"
    dest.mkdir()
    run(complete, dest, require_end_marker=True)
    lenient = tmp_path / "lenient"
    lenient.mkdir()
    run(no_marker, lenient)  # plain extraction accepts a stream without the marker
    cases = {
        "no-marker": no_marker,
        "half-marker": no_marker + bytes(512),
        "inside-member": big_tar[:50_000],
        "inside-header": big_tar[
            : 20_992 + 100
        ],  # each member is a 512-byte header and 20480 of data
        "empty": b"",
    }
    for label, data in cases.items():
        dest = tmp_path / label
        dest.mkdir()
        with pytest.raises(
            StagingError, match="the download of bafytestcid was truncated"
        ) as caught:
            run(data, dest, require_end_marker=True, compression="tar")
        assert not isinstance(caught.value, BadRootfsError), label


def test_too_much_trailing_data(tmp_path: Path) -> None:
    data = gzip.compress(
        tar_bytes(regular("a")) + bytes(archive.MAX_TRAILING_BYTES + 4096), compresslevel=1
    )
    with pytest.raises(BadRootfsError, match="after its end-of-archive marker"):
        run(data, tmp_path)


def test_unknown_compression_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown compression"):
        run(b"", tmp_path, compression="xz")


# --- cleanup of helpers ----------------------------------------------------------------------


COMPRESSORS = {"gzip": lambda data: gzip.compress(data, compresslevel=1), "zstd": _zstd}


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
@pytest.mark.parametrize("interrupt", [UnsafeArchiveError, KeyboardInterrupt])
def test_decoder_thread_stops_on_errors(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    interrupt: type[BaseException],
    compression: str,
) -> None:
    members = [regular(f"f{i}", os.urandom(50_000)) for i in range(200)]
    if interrupt is UnsafeArchiveError:
        members.insert(3, regular("../evil"))
    else:
        monkeypatch.setattr(
            archive, "_split_path", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt)
        )
    threads_before = threading.active_count()
    with pytest.raises(interrupt):
        run(COMPRESSORS[compression](tar_bytes(*members)), tmp_path)
    assert threading.active_count() == threads_before
