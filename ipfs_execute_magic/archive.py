"""Safe extraction of untrusted tar archives (.tar, .tar.gz, .tar.zst).

Rootfs tarballs and input trees come from IPFS, so anyone may have written them. Extraction
never follows a symlink on the host: every member's parent is reached with
openat(O_DIRECTORY|O_NOFOLLOW) one path component at a time from `dest`, so a member can only
ever create something inside `dest`. Symlinks are stored verbatim (they resolve only inside the
sandbox), hard links may only point at regular files already extracted into `dest`, device
nodes and fifos are refused, setuid/setgid/sticky bits are dropped and nothing is chowned.

Plain ustar/GNU headers (alone or after a pax header) are parsed here the way tarfile parses them;
everything else (global pax headers, GNU long names, sparse files ...) by tarfile itself. The
writing is done here, never by tarfile's extract. Decompression runs in a thread (zlib and
zstandard release the GIL) concurrently with the writing, so that both cores are busy.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import queue
import re
import stat
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

from .errors import BadRootfsError, StagingError, TruncatedStreamError, UnsafeArchiveError

__all__ = ["ArchiveLimits", "ExtractStats", "extract", "sniff_compression"]

COMPRESSIONS = ("gzip", "zstd", "tar")

BLOCK = tarfile.BLOCKSIZE
ZERO_BLOCK = bytes(BLOCK)
CHUNK = 1 << 20
# Pax records, GNU long names and sparse maps are held in memory while a header is parsed;
# real ones are a few KiB, so a bigger one can only be an attempt to exhaust memory.
MAX_HEADER_BYTES = 1 << 20
# GNU tar pads archives to a 10 KiB record; much more data after the end-of-archive marker
# is not padding, and draining it would let a compressed stream of zeros run for ever.
MAX_TRAILING_BYTES = 16 << 20
# Open directory fds kept for reuse; members come grouped by directory so a small cache hits.
MAX_CACHED_DIRS = 256
# Deeper directories are walked with transient fds, so a path of thousands of components
# (pax names have no length limit) cannot exhaust the fd table.
MAX_CACHED_DEPTH = 64
# No real root filesystem nests this deep; deeper trees would exhaust the recursion of every
# tool that walks them later (Python's os.walk, rmtree), so they are refused outright.
MAX_PATH_DEPTH = 256

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SETID_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX

_DIR_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_TYPE_NAMES = {
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a fifo",
}


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 1_000_000
    max_total_bytes: int = 64 * 1024**3  # sum of member sizes (decompressed)
    max_member_bytes: int = 16 * 1024**3


@dataclass(frozen=True)
class ExtractStats:
    members: int
    files: int
    dirs: int
    symlinks: int
    hardlinks: int
    bytes: int
    stripped_setid: tuple[str, ...]  # members whose setuid/setgid/sticky bits were dropped


def sniff_compression(head: bytes) -> str | None:
    """Name the format of a stream from its first bytes (512 are enough): gzip, zstd or tar."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if len(head) >= BLOCK and (head[:BLOCK] == ZERO_BLOCK or _has_valid_checksum(head[:BLOCK])):
        return "tar"  # an empty archive, or an old v7 header without the ustar magic
    return None


def _has_valid_checksum(block: bytes) -> bool:
    field = block[148:156].replace(b"\0", b" ").strip()
    try:
        stored = int(field, 8)
    except ValueError:
        return False
    # The checksum is computed with its own field taken as eight spaces.
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    return stored == unsigned


class ByteSource(Protocol):
    """What extraction reads from: a file or an HTTP response body, read front to back."""

    def read(self, size: int = -1, /) -> bytes: ...


def extract(
    source: ByteSource,
    dest: Path,
    *,
    name: str = "archive",
    compression: str = "auto",
    limits: ArchiveLimits = ArchiveLimits(),
    require_end_marker: bool = False,
) -> ExtractStats:
    """Unpack the archive read from `source` into the existing, empty directory `dest`.

    `name` (a CID, say) identifies the archive in error messages. On any error `dest` holds a
    partial tree that the caller must discard. With `require_end_marker`, a stream that stops
    before the tar end-of-archive marker is a truncated download (StagingError).
    """
    if compression != "auto" and compression not in COMPRESSIONS:
        raise ValueError(
            f"unknown compression {compression!r}; use auto, {', '.join(COMPRESSIONS)}"
        )
    head = _read_head(source, BLOCK)
    if not head and require_end_marker:
        raise TruncatedStreamError(
            f"the download of {name} was truncated (no data arrived); retry the fetch"
        )
    kind = sniff_compression(head) if compression == "auto" else compression
    if kind is None:
        raise BadRootfsError(
            f"{name} is not a .tar, .tar.gz or .tar.zst archive (it starts with "
            f"{head[:8].hex() or 'nothing'}); publish the tree as a tarball, e.g. tar czf x.tar.gz -C dir ."
        )
    decoder = _open_decoder(kind, source, head)
    try:
        writer = _TreeWriter(dest, name, limits)
        try:
            _Extraction(decoder, writer, name, require_end_marker).run()
            writer.finish()
        finally:
            writer.close()
        return writer.stats()
    finally:
        decoder.close()


def _read_head(source: ByteSource, size: int) -> bytes:
    parts: list[bytes] = []
    have = 0
    while have < size:
        data = source.read(size - have)
        if not data:
            break
        parts.append(data)
        have += len(data)
    return b"".join(parts)


# --- decompression ---------------------------------------------------------------------------


class _DecodeError(Exception):
    """The compressed stream is corrupt, truncated, or could not be read."""

    def __init__(self, detail: str, *, truncated: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.truncated = truncated


def _open_decoder(kind: str, source: ByteSource, head: bytes) -> _Decoder:
    # Decompressing in a thread of this process (zlib and zstandard release the GIL) measured
    # faster here than a pigz or zstd process: no pipe to copy through and no feeder thread.
    if kind == "gzip":
        return _Decoder(_gunzip(_source_chunks(source, head)))
    if kind == "zstd":
        return _Decoder(_unzstd(_source_chunks(source, head)))
    if kind == "tar":
        # A thread still pays off: reading a pipe or a network stream overlaps the writing.
        return _Decoder(_source_chunks(source, head))
    raise ValueError(f"unknown compression {kind!r}")


def _source_chunks(source: ByteSource, head: bytes) -> Iterator[bytes]:
    if head:
        yield head
    while True:
        try:
            data = source.read(CHUNK)
        except OSError as exc:
            raise _DecodeError(f"reading the stream failed: {exc}", truncated=True) from exc
        if not data:
            return
        yield data


def _gunzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Decompress gzip members one after another, with bounded output per step (gzip bombs)."""
    inflater: zlib._Decompress | None = None
    carry = b""
    for data in chunks:
        if carry:
            data, carry = carry + data, b""
        while data:
            if inflater is None:
                if len(data) < 2:
                    carry = data
                    break
                if not data.startswith(_GZIP_MAGIC):
                    return  # trailing garbage after the last member: gzip ignores it too
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                out = inflater.decompress(data, CHUNK)
            except zlib.error as exc:
                raise _DecodeError(f"gzip data error: {exc}") from None
            if out:
                yield out
            if inflater.eof:
                data = inflater.unused_data
                inflater = None
            elif inflater.unconsumed_tail:
                data = inflater.unconsumed_tail
            elif len(out) == CHUNK:
                data = b""
                # Output may still be pending inside zlib with all the input consumed.
                while True:
                    out = inflater.decompress(b"", CHUNK)
                    if out:
                        yield out
                    ended: bool = inflater.eof  # declared: mypy keeps the narrowing above
                    if len(out) < CHUNK or ended:
                        break
                if ended:
                    data = inflater.unused_data
                    inflater = None
            else:
                data = b""
    if inflater is not None:
        raise _DecodeError("the gzip stream ends early", truncated=True)
    # A lone byte left in `carry` cannot start a member: trailing garbage, ignored as above.


def _unzstd(chunks: Iterator[bytes]) -> Iterator[bytes]:
    import zstandard  # only for .tar.zst: the import is not free

    class _ChunkFile:
        def __init__(self) -> None:
            self._pending = b""

        def read(self, size: int = -1) -> bytes:
            if not self._pending:
                self._pending = next(chunks, b"")
            if size < 0 or size >= len(self._pending):
                data, self._pending = self._pending, b""
            else:
                data, self._pending = self._pending[:size], self._pending[size:]
            return data

    reader = zstandard.ZstdDecompressor().stream_reader(
        _ChunkFile(),  # type: ignore[arg-type]  # it reads with read() alone
        read_size=CHUNK,
        read_across_frames=True,
    )
    try:
        while True:
            out = reader.read(CHUNK)
            if not out:
                return
            yield out
    except zstandard.ZstdError as exc:
        raise _DecodeError(f"zstd data error: {exc}") from None


_END = object()


class _Decoder:
    """Decompressed bytes of the source, produced by a generator in a thread concurrently
    with the extraction (zlib and zstandard release the GIL)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._queue: queue.Queue[object] = queue.Queue(maxsize=8)
        self._stop = threading.Event()
        self._error: _DecodeError | None = None
        self._ended = False
        self._thread = threading.Thread(target=self._produce, name="archive-decoder", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for chunk in self._chunks:
                if not self._put(chunk):
                    return
        except _DecodeError as exc:
            self._error = exc
        except Exception as exc:  # a network stream may raise anything; report it as a read error
            self._error = _DecodeError(f"reading the stream failed: {exc}", truncated=True)
        finally:
            self._put(_END)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read_chunk(self) -> bytes:
        """The next decompressed chunk; b"" at the end."""
        if self._ended:
            return b""
        item = self._queue.get()
        if item is _END:
            self._ended = True
            return b""
        return item  # type: ignore[return-value]

    def finish(self) -> _DecodeError | None:
        """Wait for the producer (after read_chunk returned b"") and say how it ended."""
        self._thread.join()
        return self._error

    def close(self) -> None:
        """Stop the producer; idempotent, safe on every path."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        # The producer may be blocked reading a network stream; it is a daemon thread and
        # stops at its next put.
        self._thread.join(timeout=1.0)


# --- reading the decompressed stream ---------------------------------------------------------


class _Truncated(Exception):
    """The decompressed stream ended inside a member."""


class _HeaderTooLarge(Exception):
    def __init__(self, offset: int, size: int) -> None:
        super().__init__(offset, size)
        self.offset = offset
        self.size = size


class _StreamReader:
    """Forward-only file object over the decoded chunks.

    read/tell/seek serve tarfile's header parsing; copy_to writes member data straight from the
    chunk it arrived in, without a copy.
    """

    def __init__(self, read_chunk: Callable[[], bytes]) -> None:
        self._read_chunk = read_chunk
        self._view = memoryview(b"")
        self._pos = 0
        self._start = 0  # stream offset of _view[0]
        # The rest of a chunk whose first bytes went into a header that straddled two chunks.
        self._pending: memoryview | None = None
        self._eof = False
        self.header_budget = MAX_HEADER_BYTES

    def tell(self) -> int:
        return self._start + self._pos

    @property
    def exhausted(self) -> bool:
        return self._eof and self._pos >= len(self._view) and self._pending is None

    def _next_view(self) -> memoryview | None:
        if self._pending is not None:
            view, self._pending = self._pending, None
            return view
        if self._eof:
            return None
        chunk = self._read_chunk()
        if not chunk:
            self._eof = True
            return None
        return memoryview(chunk)

    def _fill(self) -> bool:
        """Move on to the next chunk; only called once the current one is used up."""
        view = self._next_view()
        if view is None:
            return False
        self._start += len(self._view)
        self._view = view
        self._pos = 0
        return True

    def peek(self, size: int) -> bytes:
        """The next `size` bytes (fewer at the end of the stream), not consumed."""
        end = self._pos + size
        if end <= len(self._view):
            return self._view[self._pos : end].tobytes()
        # They straddle chunks: gather them into a small buffer of their own.
        parts = [self._view[self._pos :]]
        have = len(parts[0])
        while have < size:
            view = self._next_view()
            if view is None:
                break
            take = min(size - have, len(view))
            parts.append(view[:take])
            have += take
            if take < len(view):
                self._pending = view[take:]
        data = b"".join(parts)
        self._start += self._pos
        self._view = memoryview(data)
        self._pos = 0
        return data

    def advance(self, size: int) -> None:
        """Consume bytes already returned by peek."""
        self._pos += size

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self.header_budget:
            raise _HeaderTooLarge(self.tell(), size)
        self.header_budget -= size
        end = self._pos + size
        if end <= len(self._view):
            data = self._view[self._pos : end].tobytes()
            self._pos = end
            return data
        parts = []
        while size:
            avail = len(self._view) - self._pos
            if not avail:
                if not self._fill():
                    break
                continue
            take = min(avail, size)
            parts.append(self._view[self._pos : self._pos + take])
            self._pos += take
            size -= take
        return b"".join(parts)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self.tell()
        elif whence != os.SEEK_SET:
            raise OSError(errno.ESPIPE, "the archive stream can only move forward")
        self.skip_to(offset)
        return self.tell()

    def skip_to(self, offset: int) -> None:
        need = offset - self.tell()
        if need < 0:
            raise OSError(errno.ESPIPE, "the archive stream can only move forward")
        while need:
            avail = len(self._view) - self._pos
            if not avail:
                if not self._fill():
                    raise _Truncated()
                continue
            take = min(avail, need)
            self._pos += take
            need -= take

    def copy_to(self, fd: int, size: int) -> None:
        while size:
            avail = len(self._view) - self._pos
            if not avail:
                if not self._fill():
                    raise _Truncated()
                continue
            take = min(avail, size)
            view = self._view[self._pos : self._pos + take]
            while view:
                view = view[os.write(fd, view) :]
            self._pos += take
            size -= take

    def drain(self, limit: int) -> bool:
        """Consume the rest of the stream; False if more than `limit` bytes remain."""
        seen = len(self._view) - self._pos
        self._pos = len(self._view)
        while seen <= limit and self._fill():
            seen += len(self._view)
            self._pos = len(self._view)
        return seen <= limit


# --- parsing ---------------------------------------------------------------------------------

# Member types whose header is followed by data blocks (tarfile skips the same ones).
_DATA_TYPES = frozenset(tarfile.REGULAR_TYPES)
# Members the fast path below parses itself, alone or after a pax header; everything else
# (global pax headers, GNU long names, sparse files, base-256 numbers, bad checksums, end
# blocks, malformed records) goes to tarfile.
_PLAIN_TYPES = frozenset(
    (
        tarfile.REGTYPE,
        tarfile.AREGTYPE,
        tarfile.CONTTYPE,
        tarfile.DIRTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
    )
)
MAX_FAST_PAX_BYTES = 8192
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")

_Header = tuple[str, bytes, int, int, str]  # name, type, mode, size, linkname


def _parse_header(block: bytes) -> _Header | None:
    """A ustar/GNU header read the way tarfile's TarInfo.frombuf reads it, or None if it is
    anything unusual. tarfile's generic parsing costs about 25 us a header, more than
    writing a small file, hence this fast path for the common case."""
    if len(block) != BLOCK or block[100] & 0x80 or block[124] & 0x80:
        return None
    try:
        checksum = int(block[148:156].split(b"\0", 1)[0] or b"0", 8)
        mode = int(block[100:108].split(b"\0", 1)[0] or b"0", 8)
        size = int(block[124:136].split(b"\0", 1)[0] or b"0", 8)
    except ValueError:
        return None
    # Unsigned sum with the checksum field counted as eight spaces (tarfile accepts a signed
    # sum as well: that rare case goes to tarfile).
    if checksum != sum(block) - sum(block[148:156]) + 256:
        return None
    kind = block[156:157]
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    linkname = block[157:257].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    prefix = block[345:500].split(b"\0", 1)[0]
    if kind == tarfile.AREGTYPE and name.endswith("/"):
        kind = tarfile.DIRTYPE  # old V7 directories
    if kind == tarfile.DIRTYPE:
        name = name.rstrip("/")
    if prefix and kind not in tarfile.GNU_TYPES:
        name = prefix.decode("utf-8", "surrogateescape") + "/" + name
    return name, kind, mode, size, linkname


def _parse_plain_member(reader: _StreamReader) -> tuple[_Header, int] | None:
    """The next member and its header length if it is a plain one, possibly preceded by a
    pax header (GNU tar --format=posix and Go's archive/tar write one for every member)."""
    block = reader.peek(BLOCK)
    header = _parse_header(block)
    if header is None:
        return None
    if header[1] in _PLAIN_TYPES:
        return header, BLOCK
    pax_size = header[3]
    if header[1] != tarfile.XHDTYPE or pax_size > MAX_FAST_PAX_BYTES:
        return None
    data_len = (pax_size + BLOCK - 1) & ~(BLOCK - 1)
    region = reader.peek(BLOCK + data_len + BLOCK)
    records = _parse_pax_records(region[BLOCK : BLOCK + pax_size])
    member = _parse_header(region[BLOCK + data_len :])
    if records is None or member is None or member[1] not in _PLAIN_TYPES:
        return None
    name, kind, mode, size, linkname = member
    if "path" in records:
        name = records["path"].rstrip("/")
    if "linkpath" in records:
        linkname = records["linkpath"]
    if "size" in records:
        try:
            size = int(records["size"])
        except ValueError:
            size = 0  # as tarfile does
    return (name, kind, mode, size, linkname), BLOCK + data_len + BLOCK


def _parse_pax_records(data: bytes) -> dict[str, str] | None:
    """path, linkpath and size of a pax header, decoded as tarfile decodes them; None when
    tarfile must handle it (sparse files, a declared charset, a malformed record)."""
    if b"hdrcharset" in data or b"GNU.sparse" in data:
        return None
    records: dict[str, str] = {}
    pos = 0
    while match := _PAX_RECORD.match(data, pos):
        length = int(match.group(1))
        if length == 0:
            return None
        keyword = match.group(2).decode("utf-8", "surrogateescape")
        if keyword in ("path", "linkpath", "size"):
            value = data[match.end(2) + 1 : match.start(1) + length - 1]
            records[keyword] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class _Extraction:
    def __init__(
        self, decoder: _Decoder, writer: _TreeWriter, name: str, require_end_marker: bool
    ) -> None:
        self._decoder = decoder
        self._reader = _StreamReader(decoder.read_chunk)
        self._writer = writer
        self._name = name
        self._require_end_marker = require_end_marker

    def run(self) -> None:
        try:
            self._extract_members()
        except _Truncated:
            self._fail_truncated("it ends inside a member")
        except _HeaderTooLarge as exc:
            raise UnsafeArchiveError(
                f"(header at byte {exc.offset})",
                f"has an extended header of {exc.size} bytes, more than the {MAX_HEADER_BYTES} allowed",
                source=self._name,
            ) from None
        if not self._reader.drain(MAX_TRAILING_BYTES):
            raise BadRootfsError(
                f"{self._name} has more than {MAX_TRAILING_BYTES} bytes after its end-of-archive "
                f"marker; re-create the archive with tar"
            )
        error = self._decoder.finish()
        if error is not None:
            self._fail_decode(error)

    def _extract_members(self) -> None:
        reader, writer = self._reader, self._writer
        # A TarFile only as the state tarfile's header parsing needs (global pax headers,
        # offsets); it is opened on an empty archive and then pointed at the stream.
        archive = tarfile.TarFile(
            fileobj=io.BytesIO(ZERO_BLOCK * 2), mode="r", encoding="utf-8", errors="surrogateescape"
        )
        archive.fileobj = reader  # type: ignore[assignment]  # header parsing only reads
        while True:
            plain = None if archive.pax_headers else _parse_plain_member(reader)
            if plain is not None:
                (name, kind, mode, size, linkname), header_len = plain
                reader.advance(header_len)
                data_start = reader.tell()
                writer.add(name, kind, mode, size, linkname, reader)
                if kind in _DATA_TYPES:
                    reader.skip_to(data_start + ((size + BLOCK - 1) & ~(BLOCK - 1)))
                continue
            member = self._parse_with_tarfile(archive)
            if member is None:
                return
            writer.add(
                member.name,
                member.type,
                member.mode,
                member.size,
                member.linkname,
                reader,
                sparse=member.sparse,  # type: ignore[arg-type]  # typeshed says bytes
                data_start=member.offset_data,
            )
            reader.skip_to(archive.offset)

    def _parse_with_tarfile(self, archive: tarfile.TarFile) -> tarfile.TarInfo | None:
        """The next member by tarfile's own parsing, or None at the end of the archive."""
        reader = self._reader
        reader.header_budget = MAX_HEADER_BYTES
        header_offset = reader.tell()
        archive.offset = header_offset
        try:
            return tarfile.TarInfo.fromtarfile(archive)
        except tarfile.EOFHeaderError:  # type: ignore[attr-defined]  # not in typeshed
            reader.header_budget = BLOCK
            second = reader.read(BLOCK)
            if self._require_end_marker and second != ZERO_BLOCK:
                self._fail_truncated("its end-of-archive marker is incomplete")
            return None
        except tarfile.EmptyHeaderError:  # type: ignore[attr-defined]  # not in typeshed
            if header_offset == 0:
                self._fail_truncated("it is empty")
            # The stream stopped cleanly between members, without an end marker.
            if self._require_end_marker:
                self._fail_truncated("it has no end-of-archive marker")
            return None
        except tarfile.TruncatedHeaderError:  # type: ignore[attr-defined]  # not in typeshed
            self._fail_truncated("it ends inside a header")
        except RecursionError:
            # tarfile recurses once per extended header: only a hostile chain gets this deep.
            self._fail_corrupt(f"too many chained extended headers at byte {header_offset}")
        except (tarfile.TarError, ValueError) as exc:
            if reader.exhausted:
                self._fail_truncated(f"it ends inside a header: {exc}")
            self._fail_corrupt(f"bad tar header at byte {header_offset}: {exc}")

    def _fail_truncated(self, detail: str) -> NoReturn:
        # A broken compressed stream explains a short tar stream better than the tar level.
        error = self._decoder.finish()
        if error is not None:
            self._fail_decode(error)
        if self._require_end_marker:
            raise TruncatedStreamError(
                f"the download of {self._name} was truncated ({detail}); retry the fetch"
            )
        self._fail_corrupt(detail)

    def _fail_decode(self, error: _DecodeError) -> NoReturn:
        if error.truncated and self._require_end_marker:
            raise TruncatedStreamError(
                f"the download of {self._name} was truncated ({error.detail}); retry the fetch"
            )
        self._fail_corrupt(error.detail)

    def _fail_corrupt(self, detail: str) -> NoReturn:
        raise BadRootfsError(
            f"{self._name} is corrupt or truncated ({detail}); re-create the archive and add it again"
        )


# --- writing ---------------------------------------------------------------------------------


def _split_path(raw: str, member: str, source: str, what: str = "path") -> tuple[str, ...]:
    """Relative path components of an archive path; leading "/" and "./" are dropped."""
    if "\0" in raw:
        raise UnsafeArchiveError(member, f"has a NUL byte in its {what}", source=source)
    parts = raw.split("/")
    if "" in parts or "." in parts:
        parts = [part for part in parts if part and part != "."]
    if ".." in parts:
        raise UnsafeArchiveError(member, f"has a '..' component in its {what}", source=source)
    if len(parts) > MAX_PATH_DEPTH:
        raise UnsafeArchiveError(
            member,
            f"is nested {len(parts)} directories deep (more than {MAX_PATH_DEPTH})",
            source=source,
        )
    return tuple(parts)


def _current_umask() -> int | None:
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None  # unknown: chmod every file


class _TreeWriter:
    """Creates members under `dest` without ever following a symlink on the host."""

    def __init__(self, dest: Path, source: str, limits: ArchiveLimits) -> None:
        self._source = source
        self._dest = dest
        self._limits = limits
        try:
            self._root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise StagingError(
                f"cannot open the extraction directory {dest}: {exc.strerror}"
            ) from exc
        self._dirs: dict[tuple[str, ...], int] = {(): self._root_fd}
        self._transient: list[int] = []
        umask = _current_umask()
        # Modes that the umask would change need an explicit fchmod; others do not.
        self._umask = 0o7777 if umask is None else umask
        # Directories whose final mode lacks owner write get it only at the end, so that their
        # members can still be created when extracting as an ordinary user.
        self._deferred_modes: dict[tuple[str, ...], int] = {}
        self.members = self.files = self.dirs = self.symlinks = self.hardlinks = self.bytes = 0
        self._stripped: list[str] = []

    def stats(self) -> ExtractStats:
        return ExtractStats(
            members=self.members,
            files=self.files,
            dirs=self.dirs,
            symlinks=self.symlinks,
            hardlinks=self.hardlinks,
            bytes=self.bytes,
            stripped_setid=tuple(self._stripped),
        )

    def close(self) -> None:
        for fd in [*self._dirs.values(), *self._transient]:
            os.close(fd)
        self._dirs.clear()
        self._transient.clear()

    def finish(self) -> None:
        for parts, mode in self._deferred_modes.items():
            self._release_fds()
            try:
                os.fchmod(self._dir_fd(parts, "/".join(parts) or ".", create=False), mode)
            except OSError as exc:
                self._os_failure("/".join(parts) or ".", exc)

    def _unsafe(self, member: str, reason: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(member, reason, source=self._source)

    def _os_failure(self, member: str, exc: OSError) -> NoReturn:
        raise StagingError(
            f"cannot write member {member!r} of {self._source} into {self._dest}: "
            f"{exc.strerror or exc} (check free space and permissions there)"
        ) from exc

    # Directory walk

    def _release_fds(self) -> None:
        """Close fds no caller holds any more; only called between members."""
        for fd in self._transient:
            os.close(fd)
        self._transient.clear()
        if len(self._dirs) > MAX_CACHED_DIRS:
            for key in [key for key in self._dirs if key]:
                os.close(self._dirs.pop(key))

    def _dir_fd(self, parts: tuple[str, ...], member: str, *, create: bool = True) -> int:
        """fd of the directory `parts` under dest, valid until the next _release_fds()."""
        fd = self._dirs.get(parts)
        if fd is not None:
            return fd
        known = min(len(parts) - 1, MAX_CACHED_DEPTH)
        while known and parts[:known] not in self._dirs:
            known -= 1
        fd = self._dirs[parts[:known]]
        for depth in range(known, len(parts)):
            try:
                child = self._open_subdir(fd, parts, depth, member, create)
            finally:
                if depth > MAX_CACHED_DEPTH:
                    os.close(fd)  # an uncached intermediate of a very deep path
            if depth < MAX_CACHED_DEPTH:
                self._dirs[parts[: depth + 1]] = child
            fd = child
        if len(parts) > MAX_CACHED_DEPTH:
            self._transient.append(fd)
        return fd

    def _open_subdir(
        self, parent_fd: int, parts: tuple[str, ...], depth: int, member: str, create: bool
    ) -> int:
        component = parts[depth]
        try:
            return os.open(component, _DIR_OPEN_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                # Linux reports a symlink opened with O_DIRECTORY|O_NOFOLLOW as ENOTDIR.
                is_link = stat.S_ISLNK(
                    os.stat(component, dir_fd=parent_fd, follow_symlinks=False).st_mode
                )
                kind = (
                    "a symlink (archives may not write through symlinks)"
                    if is_link
                    else "not a directory"
                )
                where = "/".join(parts[: depth + 1])
                raise self._unsafe(member, f"goes through {where!r}, which is {kind}") from None
            raise
        # Archives may omit their directories; create them as tar does.
        os.mkdir(component, 0o755, dir_fd=parent_fd)
        fd = os.open(component, _DIR_OPEN_FLAGS, dir_fd=parent_fd)
        if 0o755 & self._umask:
            os.fchmod(fd, 0o755)
        return fd

    def _remove_non_dir(self, parent_fd: int, leaf: str, member: str) -> None:
        """Make room for a member whose name was already used by a file or symlink."""
        if stat.S_ISDIR(os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False).st_mode):
            raise self._unsafe(member, "would replace a directory of the same name")
        os.unlink(leaf, dir_fd=parent_fd)  # unlinkat never follows a symlink

    # Members

    def add(
        self,
        name: str,
        kind: bytes,
        mode: int,
        size: int,
        linkname: str,
        reader: _StreamReader,
        *,
        sparse: list[tuple[int, int]] | None = None,
        data_start: int | None = None,
    ) -> None:
        """Create one member; a regular file's data is read from `reader`."""
        if self._transient or len(self._dirs) > MAX_CACHED_DIRS:
            self._release_fds()
        self.members += 1
        if self.members > self._limits.max_members:
            raise self._unsafe(
                name, f"is one member more than the limit of {self._limits.max_members}"
            )
        parts = _split_path(name, name, self._source)
        is_file = kind in _DATA_TYPES
        if mode & _SETID_BITS and (is_file or kind == tarfile.DIRTYPE):
            self._stripped.append(name)
        try:
            if is_file:
                self._add_file(
                    name, parts, (mode & 0o755) | 0o444, size, reader, sparse, data_start
                )
            elif kind == tarfile.DIRTYPE:
                self._add_dir(parts, name, (mode & 0o755) | 0o555)
            elif kind == tarfile.SYMTYPE:
                self._add_symlink(name, parts, linkname)
            elif kind == tarfile.LNKTYPE:
                self._add_hardlink(name, parts, linkname)
            elif kind in _TYPE_NAMES:
                raise self._unsafe(
                    name, f"is {_TYPE_NAMES[kind]}; archives may not create special files"
                )
            else:
                raise self._unsafe(name, f"has the unsupported tar type {kind!r}")
        except OSError as exc:
            self._os_failure(name, exc)

    def _leaf(self, parts: tuple[str, ...], member: str, kind: str) -> tuple[int, str]:
        if not parts:
            raise self._unsafe(member, f"is {kind} in place of the destination directory itself")
        return self._dir_fd(parts[:-1], member), parts[-1]

    def _add_file(
        self,
        name: str,
        parts: tuple[str, ...],
        mode: int,
        size: int,
        reader: _StreamReader,
        sparse: list[tuple[int, int]] | None,
        data_start: int | None,
    ) -> None:
        limits = self._limits
        if size > limits.max_member_bytes:
            raise self._unsafe(
                name, f"is {size} bytes, more than the limit of {limits.max_member_bytes} per file"
            )
        self.bytes += size
        if self.bytes > limits.max_total_bytes:
            raise self._unsafe(
                name, f"brings the total past the limit of {limits.max_total_bytes} bytes"
            )
        parent_fd, leaf = self._leaf(parts, name, "a file")
        try:
            fd = os.open(leaf, _FILE_CREATE_FLAGS, mode, dir_fd=parent_fd)
        except FileExistsError:
            self._remove_non_dir(parent_fd, leaf, name)
            fd = os.open(leaf, _FILE_CREATE_FLAGS, mode, dir_fd=parent_fd)
        try:
            if mode & self._umask:
                os.fchmod(fd, mode)
            if sparse is not None:
                self._write_sparse(fd, name, size, sparse, reader, data_start)
            else:
                reader.copy_to(fd, size)
        finally:
            os.close(fd)
        self.files += 1

    def _write_sparse(
        self,
        fd: int,
        name: str,
        size: int,
        sparse: list[tuple[int, int]],
        reader: _StreamReader,
        data_start: int | None,
    ) -> None:
        if data_start is not None:
            reader.skip_to(data_start)
        for offset, length in sparse:
            if offset < 0 or length < 0 or offset + length > size:
                raise self._unsafe(name, "has a sparse map that reaches past the file's size")
            os.lseek(fd, offset, os.SEEK_SET)
            reader.copy_to(fd, length)
        os.ftruncate(fd, size)

    def _add_dir(self, parts: tuple[str, ...], name: str, final_mode: int) -> None:
        self.dirs += 1
        # Owner rwx while extracting; a mode without owner write is applied at the end.
        working_mode = final_mode | 0o700
        if working_mode != final_mode:
            self._deferred_modes[parts] = final_mode
        else:
            self._deferred_modes.pop(parts, None)
        if not parts:
            os.fchmod(self._root_fd, working_mode)
            return
        parent_fd, leaf = self._dir_fd(parts[:-1], name), parts[-1]
        try:
            os.mkdir(leaf, working_mode, dir_fd=parent_fd)
        except FileExistsError:
            if parts in self._dirs or stat.S_ISDIR(
                os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False).st_mode
            ):
                # Already there (update mode, or a repeated member): only the mode changes.
                os.fchmod(self._dir_fd(parts, name), working_mode)
                return
            os.unlink(leaf, dir_fd=parent_fd)  # a file or symlink of that name gives way
            os.mkdir(leaf, working_mode, dir_fd=parent_fd)
        if working_mode & self._umask:
            os.fchmod(self._dir_fd(parts, name), working_mode)

    def _add_symlink(self, name: str, parts: tuple[str, ...], target: str) -> None:
        if "\0" in target:
            raise self._unsafe(name, "has a NUL byte in its symlink target")
        if not target:
            raise self._unsafe(name, "is a symlink with an empty target")
        parent_fd, leaf = self._leaf(parts, name, "a symlink")
        # Stored verbatim: it is only ever resolved inside the sandbox, never here.
        try:
            os.symlink(target, leaf, dir_fd=parent_fd)
        except FileExistsError:
            self._remove_non_dir(parent_fd, leaf, name)
            os.symlink(target, leaf, dir_fd=parent_fd)
        self.symlinks += 1

    def _add_hardlink(self, name: str, parts: tuple[str, ...], linkname: str) -> None:
        target_parts = _split_path(linkname, name, self._source, "hard link target")
        target = "/".join(target_parts)
        if not target_parts:
            raise self._unsafe(name, "is a hard link to the destination directory itself")
        try:
            target_parent = self._dir_fd(target_parts[:-1], name, create=False)
            target_stat = os.stat(target_parts[-1], dir_fd=target_parent, follow_symlinks=False)
        except FileNotFoundError:
            raise self._unsafe(
                name, f"is a hard link to {target!r}, which is not a file extracted before it"
            ) from None
        if not stat.S_ISREG(target_stat.st_mode):
            raise self._unsafe(name, f"is a hard link to {target!r}, which is not a regular file")
        parent_fd, leaf = self._leaf(parts, name, "a hard link")
        try:
            os.link(
                target_parts[-1],
                leaf,
                src_dir_fd=target_parent,
                dst_dir_fd=parent_fd,
                follow_symlinks=False,
            )
        except FileExistsError:
            existing = os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False)
            if (existing.st_dev, existing.st_ino) != (target_stat.st_dev, target_stat.st_ino):
                self._remove_non_dir(parent_fd, leaf, name)
                os.link(
                    target_parts[-1],
                    leaf,
                    src_dir_fd=target_parent,
                    dst_dir_fd=parent_fd,
                    follow_symlinks=False,
                )
        self.hardlinks += 1
