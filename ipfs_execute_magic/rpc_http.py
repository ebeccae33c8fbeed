"""Plain HTTP/1.1 POSTs to a daemon's RPC API, over a unix socket or TCP, on bare sockets.

A command-line run makes a handful of small RPCs, and start-up is most of what it costs:
requests (with ipfshttpclient) took about 100 ms to import and http.client (with email and
ssl) about 15 ms, against a few for this module (docs/architecture.md, "Start-up"). It
speaks only what Kubo's RPC answers need: Content-Length or chunked bodies (trailers read
and kept), keep-alive. Connections are reused, one per request in flight (the result cache
writes its index from a thread); a streamed answer gets a connection of its own, closed with
the stream. Kubo's commands and errors are the caller's business (store.py).
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import NamedTuple

RECEIVE_BUFFER = 256 * 1024
MAX_HEAD_BYTES = 64 * 1024


class AddressError(ValueError):
    """The API address is not a multiaddr this client can reach."""


class ProtocolError(Exception):
    """The daemon's answer is not HTTP as expected (or it ended halfway)."""


class Endpoint(NamedTuple):
    """Where the daemon listens, parsed from its multiaddr."""

    unix_path: str | None  # a unix socket, or None for TCP
    host: str  # host name or address (TCP)
    port: int
    tls: bool
    host_header: str


def parse_multiaddr(address: str) -> Endpoint:
    """`/unix/PATH`, `/ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT[/http|/https]` as an Endpoint."""
    if address.startswith("/unix/"):
        return Endpoint(address.removeprefix("/unix"), "localhost", 0, False, "localhost")
    parts = address.split("/")
    # ['', 'ip4', host, 'tcp', port, ('http' | 'https')?]
    if (
        len(parts) in (5, 6)
        and parts[0] == ""
        and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6")
        and parts[2]
        and parts[3] == "tcp"
        and parts[4].isdigit()
        and (len(parts) == 5 or parts[5] in ("http", "https"))
    ):
        host, port = parts[2], int(parts[4])
        shown = f"[{host}]" if ":" in host else host
        tls = len(parts) == 6 and parts[5] == "https"
        return Endpoint(None, host, port, tls, f"{shown}:{port}")
    raise AddressError(address)


class Response(NamedTuple):
    status: int
    body: bytes
    trailers: Mapping[str, str]  # of a chunked answer (Kubo's X-Stream-Error), names lowercase


class _Connection:
    """One socket and what has been received on it but not yet read."""

    def __init__(self, endpoint: Endpoint, timeout: float | None) -> None:
        if endpoint.unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(endpoint.unix_path)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if endpoint.tls:
                import ssl  # only for a daemon behind TLS

                context = ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=endpoint.host)
        self.sock = sock
        self.buffer = bytearray()
        self.reusable = False  # set once an answer has been read to its end on a kept-alive link
        self.trailers: dict[str, str] = {}

    def close(self) -> None:
        self.reusable = False
        self.sock.close()

    def _fill(self) -> bool:
        data = self.sock.recv(RECEIVE_BUFFER)
        self.buffer += data
        return bool(data)

    def _take(self, count: int) -> bytes:
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD_BYTES or not self._fill():
                raise ProtocolError("the answer ended inside a header line")
        line = self._take(end)
        del self.buffer[:2]
        return line

    def send(self, head: bytes, body: bytes) -> None:
        self.sock.sendall(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.sock.sendall(body)

    def read_head(self) -> tuple[int, dict[str, str]]:
        """The status and headers (names in lowercase) of the next answer."""
        if not self.buffer and not self._fill():
            raise ConnectionResetError("the daemon closed the connection")
        status_line = self._line().decode("latin-1")
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ProtocolError(f"not an HTTP answer: {status_line[:80]!r}")
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        self.reusable = keep
        return int(code), headers

    def body(self, headers: Mapping[str, str]) -> Generator[bytes, None, None]:
        """The body's bytes as they come; at its end the connection may be reused."""
        reusable, self.reusable = self.reusable, False
        self.trailers = {}
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_text = self._line().split(b";")[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
                if size == 0:
                    while line := self._line():  # trailers: Kubo's X-Stream-Error
                        name, _, value = line.decode("latin-1").partition(":")
                        self.trailers[name.strip().lower()] = value.strip()
                    break
                yield from self._exactly(size)
                if self._line():
                    raise ProtocolError("a chunk did not end where its size said")
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise ProtocolError("bad Content-Length") from None
            yield from self._exactly(length)
        else:  # the body runs to the end of the connection
            reusable = False
            if self.buffer:
                yield self._take(len(self.buffer))
            while data := self.sock.recv(RECEIVE_BUFFER):
                yield data
        self.reusable = reusable

    def _exactly(self, count: int) -> Generator[bytes, None, None]:
        while count > 0:
            if not self.buffer and not self._fill():
                raise ProtocolError("the answer ended before its body did")
            piece = self._take(min(count, len(self.buffer)))
            count -= len(piece)
            yield piece


class Client:
    """POSTs to one endpoint: `request` reads the answer whole, `stream` yields it in chunks.

    Errors: OSError (refused, reset, no such socket; TimeoutError past `timeout`) and
    ProtocolError (a broken answer). The Store gives no timeout: the daemon's own per-command
    `timeout` option bounds what may take long.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        base_path: str,
        headers: Mapping[str, str],
        timeout: float | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.base_path = base_path.rstrip("/")
        self.headers = dict(headers)
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()

    def _head(
        self, path: str, params: Sequence[tuple[str, str]], body: bytes, headers: Mapping[str, str]
    ) -> bytes:
        query = urllib.parse.urlencode(params)
        target = f"{self.base_path}{path}?{query}" if query else f"{self.base_path}{path}"
        lines = [
            f"POST {target} HTTP/1.1",
            f"Host: {self.endpoint.host_header}",
            f"Content-Length: {len(body)}",
        ]
        lines += [f"{name}: {value}" for name, value in {**self.headers, **headers}.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def request(
        self,
        path: str,
        params: Sequence[tuple[str, str]],
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        stall_timeout: float | None = None,
    ) -> Response:
        """`stall_timeout`: raise TimeoutError when no byte moves either way for so long."""
        content = body or b""
        head = self._head(path, params, content, headers or {})
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        reused = connection is not None
        try:
            if connection is None:
                connection = _Connection(self.endpoint, self.timeout)
            if stall_timeout is not None:
                connection.sock.settimeout(stall_timeout)
            try:
                connection.send(head, content)
                status, answer_headers = connection.read_head()
            except (BrokenPipeError, ConnectionResetError):
                if not reused:
                    raise
                # A kept-alive connection the daemon had closed meanwhile: once more, afresh.
                connection.close()
                connection = _Connection(self.endpoint, self.timeout)
                if stall_timeout is not None:
                    connection.sock.settimeout(stall_timeout)
                connection.send(head, content)
                status, answer_headers = connection.read_head()
            data = b"".join(connection.body(answer_headers))
        except BaseException:
            if connection is not None:
                connection.close()
            raise
        if connection.reusable:
            connection.sock.settimeout(self.timeout)
            with self._lock:
                self._idle.append(connection)
        else:
            connection.close()
        return Response(status, data, connection.trailers)

    def stream(
        self,
        path: str,
        params: Sequence[tuple[str, str]],
        *,
        headers: Mapping[str, str] | None = None,
        stall_timeout: float | None = None,
        on_stall: Callable[[], Exception] | None = None,
        on_stream_error: Callable[[str], Exception] | None = None,
    ) -> tuple[int, Stream]:
        """The status and the answer as a Stream (to be closed), on a connection of its own.

        `stall_timeout`: TimeoutError (or `on_stall()`, while the body is read) when no byte
        comes for so long, however long the whole answer takes. `on_stream_error(message)`: the
        exception raised at the end of an answer whose trailer says the command failed after it
        had begun (Kubo's X-Stream-Error); a stream cut that way must never read as a whole
        one."""
        connection = _Connection(self.endpoint, self.timeout)
        try:
            if stall_timeout is not None:
                connection.sock.settimeout(stall_timeout)
            connection.send(self._head(path, params, b"", headers or {}), b"")
            status, answer_headers = connection.read_head()
        except BaseException:
            connection.close()
            raise
        return status, Stream(connection, answer_headers, on_stall, on_stream_error)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class Stream:
    """An answer's body as an iterator of byte chunks; `close` ends its connection."""

    def __init__(
        self,
        connection: _Connection,
        headers: Mapping[str, str],
        on_stall: Callable[[], Exception] | None = None,
        on_stream_error: Callable[[str], Exception] | None = None,
    ) -> None:
        self._connection = connection
        self._body = connection.body(headers)
        self._on_stall = on_stall
        self._on_stream_error = on_stream_error

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._body)
        except StopIteration:
            failed = self._connection.trailers.get("x-stream-error")
            self.close()
            if failed and self._on_stream_error is not None:
                raise self._on_stream_error(failed) from None
            raise
        except TimeoutError:
            self.close()
            if self._on_stall is not None:
                raise self._on_stall() from None
            raise
        except BaseException:
            self.close()
            raise

    def read_all(self) -> bytes:
        try:
            return b"".join(self._body)
        finally:
            self.close()

    @property
    def trailers(self) -> Mapping[str, str]:
        """The trailers of a chunked answer, once read to its end (Kubo's X-Stream-Error)."""
        return self._connection.trailers

    def close(self) -> None:
        self._body.close()
        self._connection.close()
