"""Stores on S3-compatible object storage, against a real S3 server that the tests start on
localhost (moto's server mode): publish, open from the bucket alone, never a half-published
commit, the bounded disk cache, and credentials never written anywhere."""

from __future__ import annotations

import json

import pytest
import torch

import dpsn
from dpsn.errors import CacheTooLargeError, InvalidArgumentError
from dpsn.tools.cli import main as cli

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from _s3 import bucket_name, moto_server, new_bucket

# Each test trains and publishes real stores through a real S3 server: ~10-15 s on 2 cores.
pytestmark = pytest.mark.slow

GEN = {"kind": "hashed_slices", "memory_size": 4096}
SECRET = "sEcReT-never-in-a-store-7f3a"


@pytest.fixture(scope="module")
def server():
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(server, request):
    return new_bucket(server, bucket_name("b", request.node.name), SECRET)


def _trained(path, steps=3):
    pool = dpsn.create(path, 10**9, 8, generator=GEN)
    emb = dpsn.PoolEmbedding(pool, mode="sum")
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        emb(torch.randint(0, 200, (16, 4), generator=g)).sum().backward()
    pool.commit("trained")
    return pool


def test_publish_then_open_from_the_bucket(bucket, tmp_path):
    url, opts, _fs = bucket
    ids = torch.arange(200)
    with _trained(tmp_path / "s") as pool:
        out = pool.publish(url, opts)
        assert out["commit"] == pool.head and out["objects_uploaded"] > 0
        want = pool.read(ids)
        with dpsn.open(url, storage_options=opts, cache_dir=tmp_path / "cache") as r:
            assert r.head == pool.head and not r.writable
            torch.testing.assert_close(r.read(ids), want, rtol=0, atol=0)
            assert r.verify().ok
        # a second publish uploads only what changed, and readers see the new commit
        pool.write([3], torch.ones(1, 8))
        pool.commit("more")
        again = pool.publish(url, opts)
        assert 0 < again["objects_uploaded"] < out["objects_uploaded"] + 3
        with dpsn.open(url, storage_options=opts, cache_dir=tmp_path / "cache") as r:
            torch.testing.assert_close(r.read(ids), pool.read(ids), rtol=0, atol=0)
        # the older published commit stays readable
        with dpsn.open(url, at=out["commit"], storage_options=opts, cache_dir=tmp_path / "c") as r:
            torch.testing.assert_close(r.read(ids), want, rtol=0, atol=0)


def test_a_reader_never_sees_a_half_published_commit(bucket, tmp_path, monkeypatch):
    url, opts, _fs = bucket
    with _trained(tmp_path / "s") as pool:
        pool.publish(url, opts)
        first, want = pool.head, pool.read(torch.arange(200))
        pool.write([1, 2], torch.full((2, 8), 5.0))
        pool.commit()
        # the publisher dies after uploading everything but HEAD
        from dpsn.store import remote as _remote

        real_fs = _remote._fs

        class DiesAtHead:  # the real filesystem, with a fault injected at the publish point
            def __init__(self, fs):
                self.fs = fs

            def __getattr__(self, name):
                return getattr(self.fs, name)

            def pipe_file(self, path, data):
                if path.endswith("/HEAD"):
                    raise ConnectionError("killed")
                return self.fs.pipe_file(path, data)

        def fs_that_dies(url, options):
            fs, prefix = real_fs(url, options)
            return DiesAtHead(fs), prefix

        monkeypatch.setattr(_remote, "_fs", fs_that_dies)
        with pytest.raises(ConnectionError):
            pool.publish(url, opts)
        monkeypatch.undo()
    with dpsn.open(url, storage_options=opts, cache_dir=tmp_path / "cache") as r:
        assert r.head == first
        torch.testing.assert_close(r.read(torch.arange(200)), want, rtol=0, atol=0)


def test_credentials_are_never_written(bucket, tmp_path):
    url, opts, fs = bucket
    with _trained(tmp_path / "s") as pool:
        pool.publish(url, opts)
    with dpsn.open(url, storage_options=opts, cache_dir=tmp_path / "cache") as r:
        r.read(torch.arange(10))
    bucket_name = url[5:].split("/")[0]
    for key in fs.find(bucket_name):
        assert SECRET.encode() not in fs.cat_file(key), key
    for p in (tmp_path / "cache").rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p


def test_disk_cache_is_bounded_and_chunks_are_checked(bucket, tmp_path):
    url, opts, _fs = bucket
    cache = tmp_path / "cache"
    with _trained(tmp_path / "s") as pool:
        pool.publish(url, opts)
        commits = [pool.head]
        for i in range(3):
            pool.write([10 + i], torch.full((1, 8), float(i)))
            pool.commit()
            pool.publish(url, opts)
            commits.append(pool.head)
    with pytest.raises(CacheTooLargeError, match="cache_bytes"):
        dpsn.open(url, storage_options=opts, cache_dir=tmp_path / "tiny", cache_bytes=1000)
    sizes = []
    for c in commits:
        with dpsn.open(url, at=c, storage_options=opts, cache_dir=cache) as r:
            r.read(torch.arange(20))
        sizes.append(sum(p.stat().st_size for p in (cache / "objects").iterdir()))
    with dpsn.open(url, storage_options=opts, cache_dir=tmp_path / "solo"):
        solo = sum(p.stat().st_size for p in (tmp_path / "solo" / "objects").iterdir())
    cap = solo + solo // 2
    assert sizes[-1] > cap  # uncapped, the four commits' files take more
    # a cap of one and a half commits keeps the cache there: older commits are evicted
    for c in commits:
        with dpsn.open(
            url, at=c, storage_options=opts, cache_dir=tmp_path / "capped", cache_bytes=cap
        ) as r:
            r.read(torch.arange(20))
        used = sum(p.stat().st_size for p in (tmp_path / "capped" / "objects").iterdir())
        assert used <= cap
    # damaged cache entries, chunk by chunk: tests/test_remote_cache.py


def test_bucket_is_read_only_and_push_cli(bucket, tmp_path, capsys, monkeypatch):
    url, opts, _fs = bucket
    with pytest.raises(InvalidArgumentError, match="read-only"):
        dpsn.open(url, "r+", storage_options=opts)
    with _trained(tmp_path / "s") as pool:
        head, want = pool.head, pool.read(torch.arange(50))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    code = cli(["push", str(tmp_path / "s"), url, "--endpoint-url", opts["endpoint_url"], "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["commit"] == head
    with dpsn.open(url, storage_options=opts, cache_dir=tmp_path / "cache") as r:
        torch.testing.assert_close(r.read(torch.arange(50)), want, rtol=0, atol=0)


def test_gc_of_a_bucket_keeps_what_retained_commits_name(bucket, tmp_path, monkeypatch, capsys):
    """``dpsn gc URL``: records of commits not retained go, then objects no retained record
    names (a dead publisher's leftover included, once older than the grace period); HEAD's
    commit stays whole and readable."""
    from dpsn.errors import SnapshotNotFoundError
    from dpsn.store import remote

    url, opts, fs = bucket
    ids = torch.arange(200)
    commits = []
    with _trained(tmp_path / "s", steps=2) as pool:
        for k in range(3):
            pool.write([k], torch.full((1, 8), float(k)))
            pool.commit(f"c{k}")
            commits.append(pool.publish(url, opts)["commit"])
        want = pool.read(ids)
    base = url[5:]
    fs.pipe_file(f"{base}/objects/0123456789abcdef-5", b"stale")  # a dead publisher's object
    before = set(fs.find(f"{base}/objects"))

    dry = remote.gc(url, opts, grace=0, dry_run=True)  # every commit kept: only the leftover
    assert dry["removed_commits"] == [] and dry["removed_objects"] == 1
    assert set(fs.find(f"{base}/objects")) == before
    young = remote.gc(url, opts)  # within the grace period: kept
    assert young["removed_objects"] == 0 and young["young_objects_kept"] == 1

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    args = ["gc", url, "--keep-last", "1", "--grace", "0s", "--json"]
    assert cli([*args, "--endpoint-url", opts["endpoint_url"]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kept_commits"] == [commits[-1]] and out["removed_commits"] == commits[:-1]
    assert out["removed_objects"] > 1  # the leftover and the older commits' index copies
    head = json.loads(fs.cat_file(f"{base}/published/{commits[-1]:016d}.json"))
    left = {p.rsplit("/", 1)[-1] for p in fs.find(f"{base}/objects")}
    assert set(head["files"].values()) - set(head["inline"]) | {head["index"]} <= left
    assert len(left) == len(before) - out["removed_objects"]
    with dpsn.open(url, storage_options=opts, cache_dir=tmp_path / "cache") as r:
        torch.testing.assert_close(r.read(ids), want, rtol=0, atol=0)
        assert r.verify().ok
    with pytest.raises(SnapshotNotFoundError):
        dpsn.open(url, at=commits[0], storage_options=opts, cache_dir=tmp_path / "c2")
    assert remote.gc(url, opts, grace=0)["removed_objects"] == 0  # nothing more to remove
