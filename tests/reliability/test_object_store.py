"""Object-store faults on a loopback S3 server (moto): a GET that fails twice and then succeeds is
retried, and an object that is gone is named. Everything listens on 127.0.0.1 only."""

from __future__ import annotations

import gc
import http.client
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from ssl_med.data.integrity import ChunkError  # noqa: E402
from ssl_med.data.store import ImageStore  # noqa: E402

BUCKET = "ssl-med-faults"
SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"


class FlakyProxy(ThreadingHTTPServer):
    """An HTTP proxy on 127.0.0.1 in front of the S3 server that answers the first ``failures`` GETs
    of each path containing ``match`` with 503 SlowDown, and forwards everything else."""

    def __init__(self, upstream: tuple[str, int], match: str, failures: int) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream, self.match, self.failures = upstream, match, failures
        self.gets: Counter[str] = Counter()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Forward(BaseHTTPRequestHandler):
    server: FlakyProxy

    def _forward(self) -> None:
        path = self.path.split("?", 1)[0]
        if self.command == "GET" and self.server.match in path:
            self.server.gets[path] += 1
            if self.server.gets[path] <= self.server.failures:
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(SLOW_DOWN)
                return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        upstream.request(self.command, self.path, body or None, dict(self.headers))
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        upstream.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture()
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, int]]:
    """A moto S3 server on 127.0.0.1 with an empty bucket; ``(host, port)``."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    import boto3
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # handles cached by earlier tests point at their servers
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield host, port
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        # the test's filesystems are finalised here, while fsspec's loop and the server can still close their
        # aiohttp sessions; left to a later collection they log "Unclosed client session" into another test's stderr
        gc.collect()
        server.stop()


def open_store(url: str, endpoint: str) -> ImageStore:
    """``url`` read through ``endpoint``, with a fresh S3 filesystem (no cached listings or handles)."""
    return ImageStore(url, storage_options={"endpoint_url": endpoint, "skip_instance_cache": True})


def test_a_get_that_fails_twice_is_retried(s3, faults) -> None:
    url = f"s3://{BUCKET}/flaky.zarr"
    faults.write_store(url)
    proxy = FlakyProxy(s3, match="/images/ct/0/c/", failures=2)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        read = open_store(url, proxy.url).read("ct")
    finally:
        proxy.shutdown()
    np.testing.assert_array_equal(read, faults.volume())
    assert proxy.gets and all(n == 3 for n in proxy.gets.values())  # 503, 503, then the chunk


def test_a_missing_object_is_named(s3, faults) -> None:
    import boto3

    url = f"s3://{BUCKET}/lost.zarr"
    faults.write_store(url)
    client = boto3.client("s3")
    keys = sorted(
        o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="lost.zarr/images/ct/0/c/")["Contents"]
    )
    lost = keys[0]
    client.delete_object(Bucket=BUCKET, Key=lost)
    chunk = lost.removeprefix("lost.zarr/images/ct/0/")
    with pytest.raises(ChunkError, match=rf"image 'ct': chunk {chunk} of images/ct/0 in {url} is missing"):
        open_store(url, f"http://{s3[0]}:{s3[1]}").read("ct")
