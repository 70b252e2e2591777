"""A real S3-compatible server for the tests (moto's server mode on localhost) and buckets on it,
shared by the object-storage tests (tests/test_remote.py, tests/test_remote_cache.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on a free localhost port, for the ``with`` block: its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.stop()


def new_bucket(endpoint: str, name: str, secret: str) -> tuple[str, dict[str, Any], Any]:
    """Make bucket ``name`` (a valid bucket name) on ``endpoint``: the pool URL in it, the
    storage options that reach it, and an s3fs filesystem on it."""
    import s3fs

    opts = {
        "endpoint_url": endpoint,
        "key": "AKIDTEST",
        "secret": secret,
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    fs = s3fs.S3FileSystem(**opts)
    fs.mkdir(name, region_name="eu-west-1")
    return f"s3://{name}/pool", opts, fs


def bucket_name(prefix: str, test_name: str) -> str:
    """A bucket name of its own for one test."""
    return prefix + test_name.replace("_", "-").lower()[:40]
