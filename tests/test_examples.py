"""The example images: reproducible bytes, the right layout, and they run in bubblewrap.

For now the images run under bwrap directly (as an unprivileged uid, like the core does);
later the same checks go through `ipfs-execute`. A cold run downloads the pinned .debs
(about 10 MB) once into ${XDG_CACHE_HOME:-~/.cache}/ipfs-execute/debs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfs_execute_magic.images import builders as images

# Builds images (fetching pinned .debs once) and runs them in real sandboxes.
pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
di = images.di  # ipfs_execute_magic/images/debinstall.py

EPOCH = 315532800
SANDBOX_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "TZ": "UTC",
    "SOURCE_DATE_EPOCH": str(EPOCH),
}
NOBODY = 65534
TARBALL_IMAGES = ("busybox", "python", "pkg-install")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", autouse=True)
def fixed_epoch() -> Iterator[None]:
    # A SOURCE_DATE_EPOCH in the caller's environment would change every image.
    saved = os.environ.pop("SOURCE_DATE_EPOCH", None)
    yield
    if saved is not None:
        os.environ["SOURCE_DATE_EPOCH"] = saved


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, fixed_epoch: None) -> dict[str, list[Path]]:
    """Each tarball image built twice, into two directories."""
    out: dict[str, list[Path]] = {}
    for run in ("a", "b"):
        dest = tmp_path_factory.mktemp(f"images-{run}")
        for name in TARBALL_IMAGES:
            out.setdefault(name, []).append(images.build(name, dest))
    return out


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A scratch directory the unprivileged sandbox uid can traverse (pytest's are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="ipfs-execute-examples-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def extract(tarball: Path, root: Path) -> Path:
    root.mkdir(mode=0o755)
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(root)], check=True)
    return root


def sandbox(
    root: Path, *argv: str, input_dir: Path | None = None, output_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run /sbin/init ARGV in ROOT the way ipfs-execute does: uid 0 in a user namespace."""
    cmd = [
        "bwrap",
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--unshare-user",
        "--uid",
        "0",
        "--gid",
        "0",
        "--ro-bind",
        str(root),
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
    ]
    if input_dir is not None:
        cmd += ["--ro-bind", str(input_dir), "/input", "--chdir", "/input"]
    if output_dir is not None:
        cmd += ["--bind", str(output_dir), "/output"]
    cmd += ["/sbin/init", *argv]
    if os.geteuid() == 0:
        # bwrap started by root keeps root's powers over the host: drop first.
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    return subprocess.run(cmd, env=SANDBOX_ENV, capture_output=True, text=True, timeout=120)


def writable_output(path: Path) -> Path:
    path.mkdir(mode=0o755)
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
    return path


# ---------------------------------------------------------------- reproducibility, layout


@pytest.mark.parametrize("name", TARBALL_IMAGES)
def test_building_twice_gives_identical_bytes(built: dict[str, list[Path]], name: str) -> None:
    first, second = built[name]
    assert first.name == f"{name}.tar.gz"
    assert sha256(first) == sha256(second)


@pytest.mark.parametrize("name", TARBALL_IMAGES)
def test_tarball_is_normalised(built: dict[str, list[Path]], name: str) -> None:
    raw = built[name][0].read_bytes()
    # gzip header: FLG without FNAME (0x08), MTIME 0.
    assert raw[:3] == b"\x1f\x8b\x08" and raw[3] & 0x08 == 0 and raw[4:8] == b"\0\0\0\0"
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(raw))) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names, key=lambda n: n.encode())
    assert len(names) == len(set(names))
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (EPOCH, 0, 0, "", ""), m.name
        assert m.isdir() or m.isreg() or m.issym(), m.name
        allowed = {0o755} if m.isdir() else {0o777} if m.issym() else {0o644, 0o755}
        assert m.mode in allowed, (m.name, oct(m.mode))


def _members(tarball: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tarball) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_busybox_layout(built: dict[str, list[Path]]) -> None:
    members = _members(built["busybox"][0])
    assert members["sbin/init"].isreg() and members["sbin/init"].mode == 0o755
    assert members["bin/busybox"].isreg() and members["bin/busybox"].size > 500_000
    for name in ("input", "output", "tmp", "proc", "dev", "etc", "root"):
        assert members[name].isdir(), name
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
    assert members["usr/bin/awk"].linkname == "../../bin/busybox"
    with tarfile.open(built["busybox"][0]) as tar:
        passwd = tar.extractfile("etc/passwd").read().decode()  # type: ignore[union-attr]
        group = tar.extractfile("etc/group").read().decode()  # type: ignore[union-attr]
    assert passwd.startswith("root:x:0:0:") and group.startswith("root:x:0:")


def test_python_layout(built: dict[str, list[Path]]) -> None:
    members = _members(built["python"][0])
    assert members["usr/bin/python3"].linkname == "python3.11"
    assert members["usr/bin/python3.11"].mode == 0o755
    assert members["sbin/init"].isreg() and members["bin/busybox"].isreg()
    assert not any(n.startswith("usr/share/man/") for n in members)
    assert "usr/share/doc/libc6/copyright" in members


def test_empty_is_an_empty_directory(tmp_path: Path) -> None:
    path = images.build("empty", tmp_path)
    assert path.is_dir() and list(path.iterdir()) == []


# ---------------------------------------------------------------- running in bwrap


def test_busybox_runs_shell_commands_and_scripts(
    built: dict[str, list[Path]], world_dir: Path
) -> None:
    root = extract(built["busybox"][0], world_dir / "root")
    inp = world_dir / "input"
    inp.mkdir(mode=0o755)
    (inp / "script").write_text("wc -l < /input/data > /output/lines\n")
    (inp / "data").write_text("a\nb\nc\n")
    for path in inp.iterdir():
        path.chmod(0o644)
    out = writable_output(world_dir / "output")
    run = sandbox(root, "sh", "-c", "echo blabla > /output/test", input_dir=inp, output_dir=out)
    assert run.returncode == 0, run.stderr
    assert (out / "test").read_text() == "blabla\n"
    run = sandbox(root, "sh", "script", input_dir=inp, output_dir=out)
    assert run.returncode == 0, run.stderr
    assert (out / "lines").read_text().strip() == "3"
    run = sandbox(root)
    assert run.returncode == 2 and "usage" in run.stderr


def test_python_image_runs_an_analysis(built: dict[str, list[Path]], world_dir: Path) -> None:
    root = extract(built["python"][0], world_dir / "root")
    run = sandbox(root, "python3", "-c", "import csv, json, statistics, sqlite3, zlib; print('ok')")
    assert (run.returncode, run.stdout) == (0, "ok\n"), run.stderr
    inp = world_dir / "input"
    inp.mkdir(mode=0o755)
    (inp / "data.csv").write_text("x,y\n1,2\n2,4\n3,7\n")
    (inp / "analysis.py").write_text(
        "import csv, datetime, decimal, hashlib, json, lzma, math, pathlib, sqlite3\n"
        "import statistics, struct, zlib\n"
        "rows = list(csv.DictReader(open('data.csv')))\n"
        "ys = [float(r['y']) for r in rows]\n"
        "db = sqlite3.connect(':memory:')\n"
        "db.execute('create table t (y real)')\n"
        "db.executemany('insert into t values (?)', [(y,) for y in ys])\n"
        "result = {'mean': statistics.mean(ys), 'sum': db.execute('select sum(y) from t')"
        ".fetchone()[0], 'crc': zlib.crc32(b'x'), 'sqrt2': round(math.sqrt(2), 6),\n"
        "          'epoch': datetime.datetime.fromtimestamp(315532800, datetime.timezone.utc)"
        ".year, 'sha': hashlib.sha256(b'x').hexdigest()[:8],\n"
        "          'xz': len(lzma.compress(b'abc')) > 0, 'dec': str(decimal.Decimal('1.10'))}\n"
        "pathlib.Path('/output/result.json').write_text(json.dumps(result, sort_keys=True))\n"
    )
    for path in inp.iterdir():
        path.chmod(0o644)
    out = writable_output(world_dir / "output")
    run = sandbox(root, "python3", "analysis.py", input_dir=inp, output_dir=out)
    assert run.returncode == 0, run.stderr
    assert (out / "result.json").read_text() == (
        '{"crc": 2363233923, "dec": "1.10", "epoch": 1980, "mean": 4.333333333333333, '
        '"sha": "2d711642", "sqrt2": 1.414214, "sum": 13.0, "xz": true}'
    )


def _build_deb(src: Path, dest: Path, name: str, compression: str, mtime: int) -> Path:
    """A tiny real package, built by dpkg-deb; `mtime` varies what a normaliser must hide."""
    (src / "DEBIAN").mkdir(parents=True)
    (src / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: Example <example@example.invalid>\nDescription: prints a greeting\n"
    )
    tool = src / "usr" / "bin" / name
    tool.parent.mkdir(parents=True)
    tool.write_text(f"#!/bin/sh\necho hello from {name}\n")
    tool.chmod(0o4755)  # setuid must not survive into the image
    (src / "usr" / "share" / name).mkdir(parents=True)
    (src / "usr" / "share" / name / "motd").write_text("hi\n")
    for path in src.rglob("*"):
        os.utime(path, (mtime, mtime))
    subprocess.run(
        ["dpkg-deb", f"-Z{compression}", "--root-owner-group", "--build", str(src), str(dest)],
        check=True,
        capture_output=True,
    )
    return dest


def _pkg_input(world: Path, name: str, base: Path, mtime: int) -> Path:
    """INPUT for the pkg-install image: a base rootfs and two packages (xz and gzip data)."""
    inp = world / name
    (inp / "packages").mkdir(parents=True)
    shutil.copy(base, inp / "rootfs.tar.gz")
    for package, compression in (("greet", "xz"), ("other", "gzip")):
        _build_deb(
            world / f"{name}-{package}",
            inp / "packages" / f"{package}_1.0_all.deb",
            package,
            compression,
            mtime,
        )
    for path in [inp, *inp.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return inp


def test_pkg_install_image_installs_debs_reproducibly(
    built: dict[str, list[Path]], world_dir: Path
) -> None:
    root = extract(built["pkg-install"][0], world_dir / "root")
    base = built["busybox"][0]
    results = []
    # Runs 1 and 2: the same input; run 3: packages rebuilt with other file mtimes.
    for run_no, (input_name, mtime) in enumerate(
        (("in1", 1_600_000_000), ("in1", 1_600_000_000), ("in2", 1_700_000_000))
    ):
        inp = world_dir / input_name
        if not inp.exists():
            inp = _pkg_input(world_dir, input_name, base, mtime)
        out = writable_output(world_dir / f"out{run_no}")
        run = sandbox(root, *(["install"] if run_no == 1 else []), input_dir=inp, output_dir=out)
        assert run.returncode == 0, run.stderr
        assert "unpacking greet 1.0" in run.stderr and "unpacking other 1.0" in run.stderr
        assert sorted(p.name for p in out.iterdir()) == ["rootfs.tar.gz"]
        results.append(out / "rootfs.tar.gz")
    assert len({sha256(p) for p in results}) == 1

    members = _members(results[0])
    assert members["usr/bin/greet"].mode == 0o755  # setuid bit dropped
    assert members["usr/share/greet/motd"].isreg()
    assert "bin/busybox" in members and members["sbin/init"].isreg()
    with tarfile.open(results[0]) as tar:
        status = tar.extractfile("var/lib/dpkg/status").read().decode()  # type: ignore
    assert "Package: greet\nStatus: install ok unpacked\n" in status
    assert "Package: busybox-static\n" in status

    # The produced image runs, and the installed program is in it.
    new_root = extract(results[0], world_dir / "new-root")
    run = sandbox(new_root, "greet")
    assert (run.returncode, run.stdout) == (0, "hello from greet\n"), run.stderr

    # Any other command runs as in the python image; `list` names the packages.
    run = sandbox(root, "python3", "-c", "print(6 * 7)")
    assert (run.returncode, run.stdout) == (0, "42\n"), run.stderr
    run = sandbox(root, "list", input_dir=world_dir / "in1")
    assert run.stdout.split("\n")[:2] == [
        "greet=1.0 all greet_1.0_all.deb",
        "other=1.0 all other_1.0_all.deb",
    ], run.stderr
    run = sandbox(root, input_dir=world_dir / "in1" / "packages")
    assert run.returncode == 1 and "no base image" in run.stderr


# ---------------------------------------------------------------- the installer, unit level


def _tar_bytes(entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info in entries:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def _info(
    name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.mtime = kind, mode, link, 1_234_567_890
    return info


def _deb(name: str, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> di.Deb:
    control = f"Package: {name}\nVersion: 1\nArchitecture: all\n"
    return di.Deb(
        name, control, di.parse_control(control), di.read_tar(_tar_bytes(members, data), name)
    )


def test_install_follows_merged_usr_and_copies_hard_links() -> None:
    tree: di.Tree = {
        "usr/bin": di.dir_entry(),
        "bin": di.symlink_entry("usr/bin"),
        "lib": di.symlink_entry("/usr/lib"),
    }
    deb = _deb(
        "tool",
        [
            _info("./bin", tarfile.DIRTYPE, 0o755),
            _info("./bin/tool", mode=0o6755),
            _info("./lib/x/data"),
            _info("./bin/tool2", tarfile.LNKTYPE, link="./bin/tool"),
        ],
        {"./bin/tool": b"#!/bin/sh\n", "./lib/x/data": b"d"},
    )
    di.install(tree, [deb])
    assert tree["bin"].kind == "symlink"  # a directory in a package keeps the base's symlink
    assert tree["usr/bin/tool"] == di.Entry("file", 0o755, b"#!/bin/sh\n")
    assert tree["usr/bin/tool2"].data == b"#!/bin/sh\n"
    assert tree["usr/lib/x/data"].data == b"d"
    listed = tree["var/lib/dpkg/info/tool.list"].data.decode().split()
    assert listed == ["/.", "/bin", "/bin/tool", "/bin/tool2", "/lib/x/data"]


def test_install_refuses_conflicts_and_escapes() -> None:
    a = _deb("a", [_info("etc/x")], {"etc/x": b"1"})
    b = _deb("b", [_info("etc/x")], {"etc/x": b"2"})
    with pytest.raises(di.InstallError, match="also in package a"):
        di.install({}, [a, b])
    same = _deb("c", [_info("etc/x")], {"etc/x": b"1"})
    di.install({}, [a, same])  # identical contents: allowed, as for Multi-Arch: same
    with pytest.raises(di.InstallError, match="climbs out"):
        di.read_tar(_tar_bytes([_info("../evil")], {"../evil": b"x"}), "evil")
    loop = {"a": di.symlink_entry("b"), "b": di.symlink_entry("a")}
    with pytest.raises(di.InstallError, match="too many levels"):
        di.resolve_parents(loop, "a/file")


def test_write_tar_ignores_insertion_order_and_epoch_is_honoured(tmp_path: Path) -> None:
    entries = {
        "b/file": di.file_entry(b"x"),
        "a": di.symlink_entry("/b/file"),
        "b-c": di.file_entry(b"y", executable=True),
    }
    one = di.write_tar(dict(entries), tmp_path / "one.tar.gz", epoch=EPOCH)
    two = di.write_tar(dict(reversed(list(entries.items()))), tmp_path / "two.tar.gz", epoch=EPOCH)
    assert one.read_bytes() == two.read_bytes()
    with tarfile.open(one) as tar:
        assert tar.getnames() == ["a", "b", "b-c", "b/file"]
    three = di.write_tar(dict(entries), tmp_path / "three.tar.gz", epoch=EPOCH + 1)
    assert three.read_bytes() != one.read_bytes()


def test_lock_round_trip_and_sha256_is_enforced(tmp_path: Path) -> None:
    lock = tmp_path / "packages.lock"
    lock.write_text("# header\nfoo=1:2.0-1 amd64 sha256:" + "0" * 64 + "\nbar\n")
    pins = images.read_lock(lock)
    assert pins[0] == images.Pin("foo", "1:2.0-1", "amd64", "0" * 64)
    assert pins[0].filename == "foo_1%3a2.0-1_amd64.deb"
    assert pins[1] == images.Pin("bar", "")
    images.write_lock(lock, pins[:1])
    assert lock.read_text() == "# header\nfoo=1:2.0-1 amd64 sha256:" + "0" * 64 + "\n"
    (tmp_path / pins[0].filename).write_bytes(b"not the pinned bytes")
    with pytest.raises(images.BuildError, match="does not match"):
        images.fetch_debs(pins[:1], tmp_path)
    with pytest.raises(images.BuildError, match="not pinned"):
        images.fetch_debs(pins[1:], tmp_path)


# ---------------------------------------------------------------- the build command


def _build_cli(
    tmp_path: Path, *args: str, cli: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    env["IPFS_EXECUTE_BUILD_DIR"] = str(tmp_path / "build")
    if cli is not None:
        env["IPFS_EXECUTE_CLI"] = cli
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "build"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_build_command_prints_path_or_cid(tmp_path: Path, built: dict[str, list[Path]]) -> None:
    run = _build_cli(tmp_path, "--output-only", "busybox")
    assert run.returncode == 0, run.stderr
    path = Path(run.stdout.strip())
    assert path == tmp_path / "build" / "images" / "busybox.tar.gz"
    assert sha256(path) == sha256(built["busybox"][0])

    fake = tmp_path / "fake-ipfs-execute"
    fake.write_text('#!/bin/sh\n[ "$1" = add ] && [ -e "$2" ] && echo bafyfakecid\n')
    fake.chmod(0o755)
    run = _build_cli(tmp_path, "empty", cli=str(fake))
    assert (run.returncode, run.stdout) == (0, "bafyfakecid\n"), run.stderr

    broken = tmp_path / "broken-ipfs-execute"
    broken.write_text("#!/bin/sh\necho 'no such command: add' >&2\nexit 2\n")
    broken.chmod(0o755)
    run = _build_cli(tmp_path, "busybox", cli=str(broken))
    assert run.returncode == 1 and run.stdout == ""
    assert "--output-only" in run.stderr and sha256(path) in run.stderr
