"""A webhook receiver for the tests: a real HTTP server in its own process that appends every
request it gets to a JSON-lines file and answers by path: /ok 204, /fail 500, /hold only once
the file ``LOG.hold`` is gone (a receiver that hangs for as long as a test needs).

    python webhook_receiver.py PORT LOG
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOLD_LIMIT_SECONDS = 120.0
_lock = threading.Lock()


class Receiver(BaseHTTPRequestHandler):
    log_path = ""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        record = {
            "path": self.path,
            "time": time.time(),
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode(),
        }
        with _lock, open(self.log_path, "a") as log:
            log.write(json.dumps(record) + "\n")
        if self.path.startswith("/hold"):
            deadline = time.monotonic() + HOLD_LIMIT_SECONDS
            while os.path.exists(self.log_path + ".hold") and time.monotonic() < deadline:
                time.sleep(0.1)
        status = 500 if self.path.startswith("/fail") else 204 if self.path.startswith("/ok") else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    port, Receiver.log_path = int(sys.argv[1]), sys.argv[2]
    ThreadingHTTPServer(("127.0.0.1", port), Receiver).serve_forever()


if __name__ == "__main__":
    main()
