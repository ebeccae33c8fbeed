"""One HTTP/1.1 POST whose body is sent while its response is read.

Kubo's `/add` answers each file as soon as it is imported, long before the request ends. A
client that sends the whole body before it reads (requests, and so ipfshttpclient) stops dead
once both sides' socket buffers are full: the daemon waits for its replies to be read, the
client for its body to be taken. Here a thread sends the body while the calling thread reads
the response, and the exchange is given up only when no byte has moved either way for
`stall_timeout` seconds, however long the whole transfer takes.

The HTTP framing (chunked request body, chunked response with trailers) is h11's.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import h11

SEND_BUFFER = 256 * 1024  # many small files are coalesced into writes of this size
RECEIVE_BUFFER = 256 * 1024
POLL_S = 0.5  # how often each side looks at the stall clock and the stop flag
WAIT_POLL_S = 0.1  # the same, when the reader also calls on_wait
MAX_ERROR_BODY = 64 * 1024


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon listens: an (host, port) pair or a unix socket path."""

    family: socket.AddressFamily
    address: tuple[str, int] | str
    host_header: str
    tls: bool = False


@dataclass
class Reply:
    """What is kept of a response: never all of it (the add replies grow with the tree)."""

    status: int = 0
    last_line: bytes = b""  # the last complete line of a 200 response
    error_body: bytes = b""  # the start of any other response
    trailers: dict[str, str] = field(default_factory=dict)


class StalledError(TimeoutError):
    """No byte was sent or received for the stall timeout."""


class _Exchange:
    def __init__(
        self,
        sock: socket.socket,
        stall_timeout: float,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.sock = sock
        self.stall_timeout = stall_timeout
        self.on_wait = on_wait
        self.connection = h11.Connection(h11.CLIENT)
        self.lock = threading.Lock()  # h11's state is shared by the sender and the reader
        self.last_moved = time.monotonic()
        self.stop = threading.Event()
        self.body_error: BaseException | None = None  # raised while producing the body
        self.send_error: BaseException | None = None  # raised while writing to the socket

    def stalled(self) -> bool:
        return time.monotonic() - self.last_moved > self.stall_timeout

    def send_bytes(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.stop.is_set():
                raise InterruptedError("the exchange was ended")
            try:
                sent = self.sock.send(view)
            except TimeoutError:
                if self.stalled():
                    raise StalledError("the daemon took no bytes") from None
                continue
            self.last_moved = time.monotonic()
            view = view[sent:]

    def send_event(self, event: h11.Event) -> None:
        with self.lock:
            data = self.connection.send(event)
        if data:
            self.send_bytes(data)

    def send_body(self, body: Iterable[bytes]) -> None:
        pending = bytearray()
        chunks = iter(body)
        try:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                except BaseException as error:
                    self.body_error = error
                    raise
                pending += chunk
                if len(pending) >= SEND_BUFFER:
                    self.send_event(h11.Data(data=bytes(pending)))
                    pending.clear()
            if pending:
                self.send_event(h11.Data(data=bytes(pending)))
            self.send_event(h11.EndOfMessage())
        except BaseException as error:
            if self.body_error is None:
                self.send_error = error
            # Abort the request: the daemon must not take a cut body for a whole one.
            _shutdown(self.sock)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # a generator left half-way closes the file it was reading

    def receive(self) -> Reply:
        reply = Reply()
        tail = b""
        while True:
            with self.lock:
                event = self.connection.next_event()
            if event is h11.NEED_DATA:
                if self.body_error is not None:
                    raise self.body_error  # what the daemon says next no longer matters
                if self.on_wait is not None:
                    self.on_wait()
                try:
                    data = self.sock.recv(RECEIVE_BUFFER)
                except TimeoutError:
                    if self.stalled():
                        raise StalledError("the daemon neither took nor sent a byte") from None
                    continue
                self.last_moved = time.monotonic()
                with self.lock:
                    self.connection.receive_data(data)
                continue
            if event is h11.PAUSED:  # only after a whole response; never reached before it
                raise ConnectionError("the daemon sent more than one response")
            if isinstance(event, h11.Response):
                reply.status = event.status_code
            elif isinstance(event, h11.Data):
                if reply.status == 200:
                    lines = (tail + bytes(event.data)).rsplit(b"\n", 2)
                    if len(lines) >= 2:
                        complete = lines[-2]
                        if complete.strip():
                            reply.last_line = complete
                    tail = lines[-1]
                elif len(reply.error_body) < MAX_ERROR_BODY:
                    reply.error_body += bytes(event.data)[:MAX_ERROR_BODY]
            elif isinstance(event, h11.EndOfMessage):
                if tail.strip():
                    reply.last_line = tail
                reply.trailers = {
                    name.decode("latin-1").lower(): value.decode("utf-8", "replace")
                    for name, value in event.headers
                }
                return reply
            elif isinstance(event, h11.ConnectionClosed):
                raise self.failure()

    def failure(self) -> BaseException:
        """Why the connection ended early: the sender's reason first, if it had one."""
        if self.body_error is not None:
            return self.body_error
        if self.send_error is not None and not isinstance(self.send_error, InterruptedError):
            return self.send_error
        return ConnectionError("the daemon closed the connection before it answered")


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _connect(endpoint: Endpoint) -> socket.socket:
    if endpoint.family == socket.AF_UNIX:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(POLL_S * 20)
        sock.connect(endpoint.address)
    else:
        assert isinstance(endpoint.address, tuple)
        sock = socket.create_connection(endpoint.address, timeout=POLL_S * 20)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if endpoint.tls:
        host = endpoint.host_header.rsplit(":", 1)[0].strip("[]")
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    sock.settimeout(POLL_S)
    return sock


def post(
    endpoint: Endpoint,
    target: str,
    body: Iterable[bytes],
    *,
    headers: Mapping[str, str],
    stall_timeout: float,
    on_wait: Callable[[], None] | None = None,
) -> Reply:
    """POST `body` (chunked) to `target`, reading the response as it comes.

    `on_wait` is called in the calling thread at least every WAIT_POLL_S seconds until the
    response ends (for progress reports, which must not come from the sending thread).

    An exception raised by `body` itself is re-raised here as it is; a daemon that stops moving
    raises StalledError; a broken connection raises an OSError. An interrupt (Ctrl-C) in the
    calling thread ends the exchange and propagates.
    """
    sock = _connect(endpoint)
    if on_wait is not None:
        sock.settimeout(WAIT_POLL_S)
    exchange = _Exchange(sock, stall_timeout, on_wait)
    sender: threading.Thread | None = None
    try:
        request = h11.Request(
            method="POST",
            target=target,
            headers=[
                ("Host", endpoint.host_header),
                ("Transfer-Encoding", "chunked"),
                *headers.items(),
            ],
        )
        exchange.send_event(request)
        sender = threading.Thread(
            target=exchange.send_body, args=(body,), name="ipfs-add-sender", daemon=True
        )
        sender.start()
        try:
            reply = exchange.receive()
        except h11.RemoteProtocolError:
            raise exchange.failure() from None
        if reply.status == 200 and "x-stream-error" not in reply.trailers:
            # A whole answer means the daemon took the whole body; make sure the body did end.
            sender.join()
            if exchange.body_error is not None or exchange.send_error is not None:
                raise exchange.failure()
        return reply
    finally:
        exchange.stop.set()
        _shutdown(sock)
        if sender is not None:
            sender.join()
        sock.close()
