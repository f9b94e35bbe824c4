"""Real HTTP endpoints on loopback for the storage tests: moto's S3 server, a fault-injecting proxy in front
of it, a static file server for http:// inputs, a hostile one (silent, trickling, endless answers), moto as a process
of its own (to freeze) and a TCP gate (to take an endpoint down and up). Each
runs in a daemon thread and stops on ``close()``."""

from __future__ import annotations

import http.server
import logging
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from http.client import HTTPConnection

import boto3


class MotoS3:
    """moto's S3 server on 127.0.0.1 (a free port) and a boto3 client for arranging and inspecting buckets."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def objects(self, bucket: str, prefix: str = "") -> dict[str, dict]:
        """Key -> {ETag, LastModified, Size} of every object under ``prefix``."""
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = {k: item[k] for k in ("ETag", "LastModified", "Size")}
        return found

    def get(self, bucket: str, key: str) -> tuple[bytes, str]:
        """An object's bytes and content type."""
        response = self.client.get_object(Bucket=bucket, Key=key)
        return response["Body"].read(), response["ContentType"]

    def close(self) -> None:
        self._server.stop()


def client_env(server: MotoS3) -> dict[str, str]:
    """The environment that points boto3 and s3fs at ``server`` (test credentials, its endpoint)."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": server.endpoint}


@dataclass
class Fault:
    """Fail the requests that match (method, path substring): the first ``skip`` pass, then ``times`` fail,
    cycling through ``kinds``: "503" (an S3 ServiceUnavailable answer), "reset" (the connection is cut before
    any answer), "truncate" (the answer's headers and half its body, then the connection is cut)."""

    method: str
    path: str
    times: int
    kinds: tuple[str, ...] = ("503", "reset")
    skip: int = 0
    seen: int = 0
    failed: int = 0

    def take(self, method: str, path: str) -> str | None:
        if method != self.method or self.path not in path or self.failed >= self.times:
            return None
        self.seen += 1
        if self.seen <= self.skip:
            return None
        self.failed += 1
        return self.kinds[(self.failed - 1) % len(self.kinds)]


_UNAVAILABLE = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
                b"<Message>injected fault</Message></Error>")


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients expect from S3

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = b""
            while True:
                size_line = self.rfile.readline()
                raw += size_line
                size = int(size_line.split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size + 2)
                raw += chunk
                if size == 0:
                    while chunk not in (b"\r\n", b""):  # trailers end with an empty line
                        chunk = self.rfile.readline()
                        raw += chunk
                    return raw
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        """Cut the connection the hard way (RST), as a failing load balancer does."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _forward(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._body()
        fault = proxy.record(self.command, self.path)
        if fault == "reset":
            self._reset()
            return
        if fault == "503":
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_UNAVAILABLE)))
            self.end_headers()
            self.wfile.write(_UNAVAILABLE)
            return
        upstream = HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=30)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                upstream.putheader(name, value)
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if fault == "truncate" and self.command == "GET" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._reset()
            return
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that counts requests and injects ``faults``."""

    def __init__(self, upstream: str):
        host_port = upstream.split("://", 1)[1]
        self.upstream_host, port = host_port.rsplit(":", 1)
        self.upstream_port = int(port)
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.on_request: Callable[[str, str], None] | None = None  # called with (method, path) before forwarding
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def record(self, method: str, path: str) -> str | None:
        if self.on_request:
            self.on_request(method, path)
        with self._lock:
            self.requests.append((method, path))
            for fault in self.faults:
                kind = fault.take(method, path)
                if kind:
                    return kind
        return None

    def count(self, method: str, path: str) -> int:
        """Requests seen so far with this method whose path (query included) contains ``path``."""
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and path in p)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class StaticServer:
    """A threaded http.server serving ``folder`` on 127.0.0.1."""

    def __init__(self, folder: str):
        handler = partial(_QuietFiles, directory=str(folder))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class HostileServer:
    """An HTTP server on 127.0.0.1 that misbehaves by path, as servers in the wild do:

    - ``/silent/...``: accepts the connection, reads the request, never answers;
    - ``/trickle/...``: answers 200 with no length, then one byte every 50 ms, forever;
    - ``/endless/...``: answers 200 with no length, then 64 KiB chunks as fast as it can, forever;
    - anything else: the file of that name in ``folder`` (when given), else 404.

    ``requests`` counts the requests per first path segment. ``close()`` ends every hanging answer."""

    def __init__(self, folder: str | None = None):
        self.folder = folder
        self.requests: dict[str, int] = {}
        self.closing = threading.Event()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HostileHandler)
        self._server.daemon_threads = True
        self._server.hostile = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()


class _HostileHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection does: no length needed

    def log_message(self, *args) -> None:
        pass

    def _answer(self) -> None:
        hostile: HostileServer = self.server.hostile  # type: ignore[attr-defined]
        kind = self.path.strip("/").split("/", 1)[0]
        hostile.requests[kind] = hostile.requests.get(kind, 0) + 1
        try:
            if kind == "silent":
                hostile.closing.wait()
                return
            if kind in ("trickle", "endless"):
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                if self.command == "HEAD":
                    return
                chunk, pause = (b"\x89", 0.05) if kind == "trickle" else (b"\0" * 65536, 0)
                while not hostile.closing.is_set():
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    if pause:
                        time.sleep(pause)
                return
            path = os.path.join(hostile.folder or "/nonexistent", self.path.lstrip("/"))
            if not hostile.folder or not os.path.isfile(path):
                self.send_error(404)
                return
            with open(path, "rb") as handle:
                data = handle.read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass

    do_GET = do_HEAD = _answer


def refused_url() -> str:
    """An http:// URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MotoProcess:
    """moto's S3 server as a process of its own on 127.0.0.1, so that a test can freeze it (SIGSTOP: it keeps
    accepting connections, through the kernel, and never answers) and thaw it (SIGCONT)."""

    def __init__(self):
        import subprocess
        import sys

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, "moto's server did not start"
                time.sleep(0.1)
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")

    def freeze(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found.extend(item["Key"] for item in page.get("Contents", []))
        return found

    def close(self) -> None:
        self.thaw()
        self.process.kill()
        self.process.wait()


class TcpGate:
    """A TCP relay on 127.0.0.1 in front of ``upstream`` (host, port) that a test can take down (its port
    refuses connections, open ones are cut, as when an endpoint stops) and bring back up on the same port."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for connection in list(self._open):
                try:
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    connection.close()
                except OSError:
                    pass
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, server))
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.close()
                except OSError:
                    pass
            with self._lock:
                self._open.discard(source)
                self._open.discard(target)

    def close(self) -> None:
        self.down()
