"""A fault-injecting HTTP proxy for tests: forwards every request to an S3 server (moto) and,
by rules the test adds and removes while it runs, answers some of them with S3 errors or
resets their connection instead.

It runs as a thread of the test process on loopback; the processes under test (API, worker)
are pointed at it as their S3 endpoint. Standard library only. Requests and responses are
forwarded as they are (the Host header included: boto3 signs for the proxy's address, and
moto does not check signatures), bodies streamed in pieces, chunked or not.

Faults:

* ``"500"``: HTTP 500 InternalError, ``"503"``: 503 ServiceUnavailable, ``"slowdown"``: 503
  SlowDown (throttling); S3's XML error bodies, sent after the request body was read.
* ``"reset_request"``: the connection is reset (RST, SO_LINGER 0) after the request headers
  and half its body: nothing reaches the server.
* ``"reset_response"``: the request is forwarded and the server acts on it, then the client's
  connection is reset after the response headers and half the body (before any of the
  response when it has no body): the client cannot tell whether the request took effect.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

FAULTS = ("500", "503", "slowdown", "reset_request", "reset_response")
_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
}
# Headers of one hop, not to be forwarded (RFC 9110 7.6.1); Expect is answered here.
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect", "transfer-encoding"}
_PIECE = 64 * 1024


@dataclass
class Rule:
    """Inject ``fault`` into requests whose method is ``method`` (any if None), whose unquoted
    path ("/bucket/key") matches the regex ``path`` and whose raw query string matches the
    regex ``query`` (any if None): the next ``times`` such requests, or all of them if None."""

    fault: str
    method: str | None = None
    path: str = ""
    query: str | None = None
    times: int | None = None
    injected: int = 0

    def matches(self, method: str, path: str, query: str) -> bool:
        if self.times is not None and self.injected >= self.times:
            return False
        if self.method is not None and self.method != method:
            return False
        if not re.search(self.path, path):
            return False
        return self.query is None or re.search(self.query, query) is not None


@dataclass(frozen=True)
class Seen:
    """One request the proxy received, and the fault it got (None: forwarded untouched)."""

    method: str
    path: str
    query: str
    fault: str | None


@dataclass
class FaultProxy:
    upstream: str  # "http://127.0.0.1:PORT"
    rules: list[Rule] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control

    def add(self, fault: str, *, method: str | None = None, path: str = "", query: str | None = None, times: int | None = None) -> Rule:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        rule = Rule(fault, method, path, query, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule (the record of requests stays)."""
        with self._lock:
            self.rules.clear()

    def requests(self, method: str | None = None, path: str = "", query: str | None = None) -> list[Seen]:
        """The requests received so far that match, like a rule's filter."""
        with self._lock:
            seen = list(self.seen)
        return [
            s
            for s in seen
            if (method is None or s.method == method) and re.search(path, s.path) and (query is None or re.search(query, s.query))
        ]

    def _decide(self, method: str, path: str, query: str) -> str | None:
        with self._lock:
            fault = None
            for rule in self.rules:
                if rule.matches(method, path, query):
                    rule.injected += 1
                    fault = rule.fault
                    break
            self.seen.append(Seen(method, path, query, fault))
            return fault

    # ------------------------------------------------------------------ life

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.proxy = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like S3: botocore reuses pooled connections

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    @property
    def proxy(self) -> FaultProxy:
        return self.server.proxy  # type: ignore[attr-defined]

    def _handle(self) -> None:
        url = urlsplit(self.path)
        fault = self.proxy._decide(self.command, unquote(url.path), url.query)
        if fault is None:
            self._forward(reset=False)
        elif fault in _ERRORS:
            for _ in self._body():
                pass
            self._send_error(*_ERRORS[fault])
        elif fault == "reset_request":
            self._body_half()
            self._reset()
        else:
            self._forward(reset=True)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

    # ------------------------------------------------------------------ request body

    def _chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _body(self) -> Iterator[bytes]:
        """The request body as it came over the wire (chunk framing kept), in pieces."""
        if self._chunked():
            while True:
                line = self.rfile.readline()
                yield line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        trailer = self.rfile.readline()
                        yield trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return
                if not (yield from self._exactly(size + 2)):  # the data and its CRLF
                    return
        else:
            yield from self._exactly(int(self.headers.get("Content-Length") or 0))

    def _exactly(self, size: int) -> Generator[bytes, None, bool]:
        """``size`` bytes of the request in pieces; returns False when the client hung up first."""
        while size:
            piece = self.rfile.read(min(size, _PIECE))
            if not piece:
                return False
            size -= len(piece)
            yield piece
        return True

    def _body_half(self) -> None:
        """Read about half the request body (for a reset in the middle of the upload)."""
        if self._chunked():
            self.rfile.readline()
            return
        half = int(self.headers.get("Content-Length") or 0) // 2
        while half:
            piece = self.rfile.read(min(half, _PIECE))
            if not piece:
                return
            half -= len(piece)

    # ------------------------------------------------------------------ answers

    def _send_error(self, status: int, code: str, message: str) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """Abort the client's connection with a TCP RST (SO_LINGER 0, then close)."""
        self.close_connection = True
        sock = self.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.rfile.close()  # its reference would keep the socket open past close()
        sock.close()

    def _forward(self, *, reset: bool) -> None:
        host, port = self.proxy._upstream
        upstream = http.client.HTTPConnection(host, port, timeout=120)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP:
                    upstream.putheader(name, value)
            if self._chunked():
                upstream.putheader("Transfer-Encoding", "chunked")  # the framing is forwarded as it came
            upstream.putheader("Connection", "close")
            upstream.endheaders()
            for piece in self._body():
                upstream.send(piece)
            response = upstream.getresponse()
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP]
            bodiless = self.command == "HEAD" or response.status in (204, 304)
            if reset:
                body = b"" if bodiless else response.read()
                if len(body) >= 2:
                    self.send_response_only(response.status, response.reason)
                    for name, value in headers:
                        if name.lower() != "content-length":
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                self._reset()
                return
            length = response.getheader("Content-Length")
            chunked = not bodiless and length is None
            self.send_response_only(response.status, response.reason)
            for name, value in headers:
                self.send_header(name, value)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if bodiless:
                return
            while piece := response.read(_PIECE):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            upstream.close()
