"""Slow clients and log spoofing, against the API started as production starts it
(``python -m api.server`` through ``start_api``: uvicorn on loopback with the settings' limits),
a real Redis-compatible server and local artifacts; no worker, so jobs stay queued.

The attack: sockets that send half a request line or half their headers, or announce a body
and send half of it. uvicorn's h11 server has no timer on a connection until a response is
complete, so each held its socket (and, with a body, a request) for ever: 200 stayed open.
Now the request line and headers have a deadline (api/server.py) and so has the body
(api.main.BodyLimit), while a long response (an event stream) is never cut. Unicode format
characters (U+202E RIGHT-TO-LEFT OVERRIDE, ...) in a URI, a name or a header are refused
with 422, and the access log escapes what a header could smuggle into it."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import stop_processes

DB = 13
HEADER_TIMEOUT = 2.0  # seconds, LOFTQ_REQUEST_HEADER_TIMEOUT_SECONDS for this module's server
BODY_TIMEOUT = 2.0  # LOFTQ_REQUEST_BODY_TIMEOUT_SECONDS
MARGIN = 20.0  # a busy 2-core machine is slow; the unfixed server never closes them at all
SLOW_SOCKETS = 200
BODY = {"source": "s3://models/llama/", "options": {"rank": 8}}
RLO = "\u202e"  # RIGHT-TO-LEFT OVERRIDE


def _env(redis_url: str, work: Path, **settings: str) -> dict[str, str]:
    return {
        **os.environ,
        "LOFTQ_REDIS_URL": redis_url.replace("/0", f"/{DB}"),
        "LOFTQ_QUEUE": f"slow-clients-{uuid.uuid4().hex[:8]}",
        "LOFTQ_STORAGE": "local",
        "LOFTQ_LOCAL_STORAGE_ROOT": str(work / "artifacts"),
        "LOFTQ_SWEEP_INTERVAL_SECONDS": "0",
        **{f"LOFTQ_{name.upper()}": value for name, value in settings.items()},
    }


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory, start_api: Callable) -> Iterator[dict]:
    """The API with short request timeouts and the default connection limit."""
    work = tmp_path_factory.mktemp("slow-clients")
    env = _env(redis_url, work, request_header_timeout_seconds=str(HEADER_TIMEOUT),
               request_body_timeout_seconds=str(BODY_TIMEOUT))
    api, base = start_api(env, work / "api.log")
    try:
        yield {"base": base, "port": urlsplit(base).port, "log": work / "api.log"}
    finally:
        stop_processes(api, [])


def _connect(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def _read_until_closed(sock: socket.socket, deadline: float) -> bytes | None:
    """Everything the server sends until it closes the connection; None if it is still open at
    ``deadline`` (a reset counts as closed)."""
    received = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data


def _half_requests(port: int) -> dict[str, list[socket.socket]]:
    """SLOW_SOCKETS connections, each stuck in a different place of its request."""
    body = json.dumps(BODY).encode()
    post = (b"POST /v1/jobs HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    stuck: dict[str, list[socket.socket]] = {"silent": [], "request line": [], "headers": [], "body": [], "after a response": []}
    for i in range(SLOW_SOCKETS):
        kind = list(stuck)[i % len(stuck)]
        if kind == "silent":
            sock = _connect(port)
        elif kind == "request line":
            sock = _connect(port, b"GET /hea")
        elif kind == "headers":
            sock = _connect(port, b"GET /healthz HTTP/1.1\r\nHost: api\r\nX-Half: ab")
        elif kind == "body":
            sock = _connect(port, post + body[: len(body) // 2])
        else:  # a keep-alive connection: one whole request and its answer, then half of the next
            sock = _connect(port, b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
            sock.settimeout(10)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        stuck[kind].append(sock)
    return stuck


def _trickle(sock: socket.socket, stop: threading.Event) -> None:
    """One header byte every 0.25 s: busy, but never finishing its headers."""
    while not stop.wait(0.25):
        try:
            sock.send(b"a")
        except OSError:
            return


def test_half_sent_requests_are_closed_and_the_api_keeps_answering(server: dict) -> None:
    started = time.monotonic()
    stuck = _half_requests(server["port"])
    trickler = _connect(server["port"], b"GET /healthz HTTP/1.1\r\nHost: api\r\nX-Slow: ")
    stop = threading.Event()
    threading.Thread(target=_trickle, args=(trickler, stop), daemon=True).start()
    try:
        with httpx.Client(base_url=server["base"], timeout=10) as client:  # while all of them hang
            assert client.get("/healthz").status_code == 200
            assert client.get("/v1/jobs").status_code == 200
        deadline = started + max(HEADER_TIMEOUT, BODY_TIMEOUT) + MARGIN
        answers = {kind: [_read_until_closed(sock, deadline) for sock in socks] for kind, socks in stuck.items()}
        trickled = _read_until_closed(trickler, deadline)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        for sock in [trickler, *(s for socks in stuck.values() for s in socks)]:
            sock.close()
    still_open = {kind: sum(a is None for a in found) for kind, found in answers.items()}
    assert not any(still_open.values()) and trickled is not None, f"open after {elapsed:.1f} s: {still_open}"
    assert elapsed >= min(HEADER_TIMEOUT, BODY_TIMEOUT) * 0.9  # closed by the deadline, not at once
    assert answers["silent"] == [b""] * len(answers["silent"])  # nothing sent, nothing answered
    for kind in ("request line", "headers", "after a response", "body"):
        for answer in answers[kind]:
            response = answer.split(b"HTTP/1.1 200 OK", 1)[-1] if kind == "after a response" else answer
            assert b" 408 " in response.split(b"\r\n", 1)[0], (kind, answer[:200])
            error = json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]
            assert error["code"] == "request_timeout", (kind, error)
            setting = "BODY" if kind == "body" else "HEADER"
            assert f"LOFTQ_REQUEST_{setting}_TIMEOUT_SECONDS" in error["message"], (kind, error)


def test_a_slow_but_steady_request_within_the_deadlines_is_served(server: dict) -> None:
    body = json.dumps({**BODY, "metadata": {"case": "steady"}}).encode()
    pieces = [b"POST /v1/jobs HTTP/1.1\r\nHost: api\r\n", b"Content-Type: application/json\r\n",
              b"Content-Length: %d\r\n\r\n" % len(body), body[:20], body[20:]]
    sock = _connect(server["port"])
    try:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.2)
        answer = _read_until_closed_or_answered(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 202"), answer[:200]


def _read_until_closed_or_answered(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    received = b""
    while b"\r\n\r\n" not in received:
        data = sock.recv(65536)
        if not data:
            break
        received += data
    return received


def _put_upload(port: int, path: str, size: int, pieces: list[bytes], pause: float) -> bytes:
    sock = _connect(port, b"PUT %s HTTP/1.1\r\nHost: api\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                    % (path.encode(), size))
    try:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(pause)
        return _read_until_closed(sock, time.monotonic() + BODY_TIMEOUT + MARGIN) or b"(still open)"
    finally:
        sock.close()


def test_an_upload_streams_past_the_body_deadline_while_it_moves_and_ends_when_it_stalls(server: dict) -> None:
    """A file PUT to the API (local storage) is larger than LOFTQ_MAX_REQUEST_BYTES and may take
    longer than the body deadline as a whole; a pause longer than it ends the upload with 408."""
    size, piece = 3 * 2**20, b"\0" * 2**19
    with httpx.Client(base_url=server["base"], timeout=10) as client:
        urls = [urlsplit(client.post("/v1/uploads", json={"files": {"model.safetensors": size}})
                         .json()["files"][0]["url"]).path for _ in range(2)]
    started = time.monotonic()
    steady = _put_upload(server["port"], urls[0], size, [piece] * 6, pause=BODY_TIMEOUT / 3)
    assert steady.startswith(b"HTTP/1.1 204"), steady[:300]
    assert time.monotonic() - started > BODY_TIMEOUT  # longer than the deadline for a whole body
    stalled = _put_upload(server["port"], urls[1], size, [piece] * 3, pause=0)
    assert stalled.startswith(b"HTTP/1.1 408") and b"request_timeout" in stalled, stalled[:300]


def test_an_event_stream_outlives_the_request_timeouts(server: dict) -> None:
    """The deadlines bound reading a request, not writing a response: a follower that keeps
    its stream open for longer than both still gets the job's next event."""
    with httpx.Client(base_url=server["base"], timeout=30) as client:
        job = client.post("/v1/jobs", json={**BODY, "metadata": {"case": "stream"}}).json()
        with client.stream("GET", f"/v1/jobs/{job['id']}/events/stream") as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            time.sleep(HEADER_TIMEOUT + BODY_TIMEOUT + 1)
            assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
            states = []
            for line in lines:
                if line.startswith("data:"):
                    states.append(json.loads(line[5:])["data"].get("state"))
                if "cancelled" in states:
                    break
    assert "cancelled" in states, states


# --------------------------------------------------------------------------- format characters


@pytest.mark.parametrize(
    ("request_args", "field", "character"),
    [
        ({"json": {**BODY, "output": f"team/{RLO}fdp.exe/"}}, "body.output", "U+202E RIGHT-TO-LEFT OVERRIDE"),
        ({"json": {**BODY, "metadata": {f"owner{RLO}": "alice"}}}, "body.metadata", "U+202E RIGHT-TO-LEFT OVERRIDE"),
        ({"json": {**BODY, "metadata": {"owner": f"alice{RLO}"}}}, "body.metadata", "U+202E RIGHT-TO-LEFT OVERRIDE"),
        ({"json": {**BODY, "metadata": {"note": "one\u2028two"}}}, "body.metadata", "U+2028 LINE SEPARATOR"),
        ({"json": BODY, "headers": {"Idempotency-Key": f"key-{RLO}".encode()}}, "Idempotency-Key", "U+202E RIGHT-TO-LEFT OVERRIDE"),
        ({"json": BODY, "headers": {"Idempotency-Key": "key-\u200b".encode()}}, "Idempotency-Key", "U+200B ZERO WIDTH SPACE"),
    ],
    ids=["output", "metadata key", "metadata value", "line separator", "idempotency key", "zero width space"],
)
def test_format_characters_in_names_are_422(server: dict, request_args: dict, field: str, character: str) -> None:
    with httpx.Client(base_url=server["base"], timeout=10) as client:
        before = len(client.get("/v1/jobs", params={"limit": 100}).json()["jobs"])
        response = client.post("/v1/jobs", **request_args)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_request" and error["message"].startswith(field), error
        assert character in error["message"], error
        assert len(client.get("/v1/jobs", params={"limit": 100}).json()["jobs"]) == before  # nothing was created


@pytest.mark.parametrize(
    ("target", "status", "code", "part"),
    [("/v1/jobs/%E2%80%AEexe.txt", 404, "not_found", "path"), ("/v1/jobs?after=1-0%0A", 422, "invalid_request", "query")],
)
def test_format_characters_in_the_request_uri_are_refused(server: dict, target: str, status: int, code: str, part: str) -> None:
    """A path with them names nothing here (404); a query with them is a bad request (422)."""
    response = httpx.get(server["base"] + target, timeout=10)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"].startswith(f"{part}: contains U+"), error


def test_the_access_log_escapes_control_characters_from_headers(server: dict) -> None:
    """X-Forwarded-For from a trusted proxy (loopback) names the client in the access log; a
    NEL (U+0085) there would start a forged line in many log viewers."""
    marker = f"forged-{uuid.uuid4().hex[:8]}"
    sock = _connect(server["port"], b"GET /healthz HTTP/1.1\r\nHost: api\r\nConnection: close\r\n"
                                    b"X-Forwarded-For: 10.0.0.1\x85" + marker.encode() + b"\r\n\r\n")
    try:
        assert (_read_until_closed(sock, time.monotonic() + 10) or b"").startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
    deadline = time.monotonic() + 10
    while marker not in server["log"].read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(line for line in server["log"].read_text().splitlines() if marker in line)
    assert "\\x85" + marker in line and "\x85" not in line, line


# --------------------------------------------------------------------------- the connection limit


def test_requests_beyond_the_connection_limit_are_503_until_connections_close(
    redis_url: str, tmp_path: Path, start_api: Callable
) -> None:
    api, base = start_api(_env(redis_url, tmp_path, max_connections="20", request_header_timeout_seconds="60"),
                          tmp_path / "api.log")
    port = urlsplit(base).port
    idle: list[socket.socket] = []
    try:
        idle = [_connect(port) for _ in range(25)]
        time.sleep(0.5)  # accepted by the server
        refused = httpx.get(f"{base}/healthz", timeout=10)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "overloaded" and refused.headers["Retry-After"] == "1"
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/healthz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "still refused after the idle connections closed"
            time.sleep(0.2)
    finally:
        for sock in idle:
            sock.close()
        stop_processes(api, [])
