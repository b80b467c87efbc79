"""A fault-injecting HTTP proxy in front of the S3 server (moto), for storage fault tests.

Clients (boto3 in the driver and in Ray workers) use the proxy's URL as their
S3 endpoint; every request is forwarded to the real server unless a rule
matches, in which case the proxy answers with the fault instead:

    503   S3's SlowDown throttling response          (transient)
    500   InternalError                               (transient)
    reset the connection is dropped without an answer (transient)
    stall no answer for `stall_s` seconds, then drop  (transient: the client times out)
    cut   the real answer's headers and half its body, then drop (transient, mid-stream)
    403   AccessDenied                                (permanent)

Rules match an operation (list, get, put, delete, head, or any) and a substring
of the path, and fire `times` times (-1: always). `injected` counts what fired.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
}


def operation(method: str, path: str) -> str:
    query = urlsplit(path).query
    parts = urlsplit(path).path.strip("/").split("/", 1)
    on_object = len(parts) == 2 and parts[1] != ""
    if method == "GET":
        return "get" if on_object else ("list" if "list-type" in query or not query else "bucket")
    return {"PUT": "put", "DELETE": "delete", "HEAD": "head", "POST": "post"}.get(method, method.lower())


class FaultProxy:
    def __init__(self, upstream: str, stall_s: float = 4.0) -> None:
        self.upstream = urlsplit(upstream)
        self.stall_s = stall_s
        self.rules: list[dict] = []
        self.injected: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                op = operation(self.command, self.path)
                fault = proxy._fault(op, self.path)
                if fault in ERRORS:
                    status, code, message = ERRORS[fault]
                    xml = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
                    self._reply(status, {"Content-Type": "application/xml"}, xml.encode())
                    return
                if fault == "reset":
                    self._drop()
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                    self._drop()
                    return
                status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
                if fault == "cut" and len(data) > 1:
                    self.send_response(status)
                    for k, v in headers:
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._drop()
                    return
                self._reply(status, dict(headers), data)

            def _reply(self, status: int, headers: dict, data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _drop(self) -> None:
                """Close with a TCP reset, as a dying load balancer would."""
                self.close_connection = True
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                except OSError:
                    pass

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, fault: str, op: str = "any", match: str = "", times: int = 1) -> None:
        with self.lock:
            self.rules.append({"fault": fault, "op": op, "match": match, "times": times})

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def _fault(self, op: str, path: str) -> str | None:
        with self.lock:
            self.requests[op] += 1
            for rule in self.rules:
                if rule["times"] != 0 and rule["op"] in ("any", op) and rule["match"] in path:
                    rule["times"] -= 1 if rule["times"] > 0 else 0
                    self.injected[f"{op}:{rule['fault']}"] += 1
                    return rule["fault"]
        return None

    def _forward(self, method: str, path: str, headers, body: bytes):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            skip = {"content-length", "transfer-encoding", "connection"}
            out = {k: v for k, v in headers.items() if k.lower() not in skip}
            out["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=out)
            resp = conn.getresponse()
            data = resp.read()
            keep = [(k, v) for k, v in resp.getheaders() if k.lower() not in skip]
            return resp.status, keep, data
        finally:
            conn.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
