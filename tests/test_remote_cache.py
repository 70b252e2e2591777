"""The chunk-level disk cache in front of a published store, against a real S3 server that the
test starts on localhost (moto's server mode): a cold read fetches only the chunks it needs, a
warm read fetches nothing, the cap holds, damaged entries are never served, and a sharded root
publishes and opens as one consistent global commit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dpsn
from dpsn.errors import CorruptSegmentError
from dpsn.store import remote

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from _s3 import bucket_name, moto_server, new_bucket

pytestmark = pytest.mark.slow  # real stores through a real S3 server: ~10 s on 2 cores

GEN = {"kind": "hashed_slices", "memory_size": 4096}
ROWS = 512  # rows written; chunk_rows=16 makes 32 delta chunks (and 32 of ids)


@pytest.fixture(scope="module")
def server():
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(server, request):
    return new_bucket(server, bucket_name("c", request.node.name), "test-secret")


class CountingFs:
    """The real filesystem, counting the object reads a reader makes through it."""

    def __init__(self, fs):
        self.fs, self.object_gets = fs, []

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def cat_file(self, path, *a, **k):
        self.object_gets.append(path)
        return self.fs.cat_file(path, *a, **k)

    def cat(self, paths, *a, **k):
        self.object_gets.extend([paths] if isinstance(paths, str) else paths)
        return self.fs.cat(paths, *a, **k)

    def get(self, rpaths, lpaths, *a, **k):
        self.object_gets.extend(rpaths)
        return self.fs.get(rpaths, lpaths, *a, **k)


@pytest.fixture
def counting(monkeypatch):
    made: list[CountingFs] = []
    real = remote._fs

    def fs(url, options):
        f, prefix = real(url, options)
        made.append(CountingFs(f))
        return made[-1], prefix

    monkeypatch.setattr(remote, "_fs", fs)
    return lambda every=False: [g for c in made for g in c.object_gets if every or "/objects/" in g]


@pytest.fixture(scope="module")
def pub(server, tmp_path_factory):
    """One store published once for the tests that only read it (each with its own cache)."""
    url, opts, fs = new_bucket(server, "cshared", "test-secret")
    want = _published(tmp_path_factory.mktemp("pub"), url, opts)
    return url, opts, fs, want


def _published(tmp_path, url, opts) -> torch.Tensor:
    with dpsn.create(tmp_path / "s", 10**9, 8, generator=GEN, chunk_rows=16) as pool:
        g = torch.Generator().manual_seed(0)
        pool.write(torch.arange(ROWS), torch.randn(ROWS, 8, generator=g))
        pool.commit("rows")
        pool.publish(url, opts)
        return pool.read(torch.arange(ROWS))


def _lazy_objects(fs, url, column: str = "") -> dict[str, int]:
    import json

    head = json.loads(fs.cat_file(url[5:] + "/HEAD"))["commit"]
    rec = json.loads(fs.cat_file(f"{url[5:]}/published/{head:016d}.json"))
    return {
        o: remote._object_size(o)
        for r, o in rec["files"].items()
        if remote.is_lazy(r) and f"/{column}" in r
    }


def test_cold_reads_fetch_only_the_chunks_they_need_and_warm_reads_none(pub, tmp_path, counting):
    url, opts, fs, want = pub
    lazy = _lazy_objects(fs, url)
    assert len(lazy) >= 64  # 32 delta chunks, 32 ids chunks
    ids = torch.tensor([5, 200, 500])  # three rows in three different chunks
    cache = tmp_path / "cache"
    before = len(counting())
    with dpsn.open(url, storage_options=opts, cache_dir=cache, cache_rows=0) as r:
        torch.testing.assert_close(r.read(ids), want[ids], rtol=0, atol=0)
        got = remote.cache_counters(r.path)
        assert got is not None
    cold = counting()[before:]
    chunk_gets = [g for g in cold if g.rsplit("/", 1)[-1] in lazy]
    # the index (one object) and the three chunks the rows lie in, nothing else of the rows
    assert len(chunk_gets) == 3 == got["misses"], cold
    assert got["fetched_bytes"] < sum(lazy.values()) / 10
    # warm: a new open of the same cache reads the same rows without a single object request
    before = len(counting())
    with dpsn.open(url, storage_options=opts, cache_dir=cache, cache_rows=0) as r:
        torch.testing.assert_close(r.read(ids), want[ids], rtol=0, atol=0)
        warm = remote.cache_counters(r.path)
    assert counting()[before:] == []
    assert warm["misses"] == 3 and warm["hits"] >= 3
    # every row, read cold, equals the writer's
    with dpsn.open(url, storage_options=opts, cache_dir=tmp_path / "c2", cache_rows=0) as r:
        torch.testing.assert_close(r.read(torch.arange(ROWS)), want, rtol=0, atol=0)


def test_the_cap_holds_and_least_recently_read_chunks_go_first(pub, tmp_path):
    url, opts, fs, want = pub
    cache = tmp_path / "cache"
    with dpsn.open(url, storage_options=opts, cache_dir=cache, cache_rows=0) as r:
        eager = remote.cache_counters(r.path)["used_bytes"]
    chunk = max(_lazy_objects(fs, url).values())
    cap = eager + 6 * chunk  # room for about six chunks beside the index and metadata
    with dpsn.open(url, storage_options=opts, cache_dir=cache, cache_bytes=cap, cache_rows=0) as r:
        for lo in range(0, ROWS, 64):  # reads walk over every chunk
            ids = torch.arange(lo, lo + 64)
            torch.testing.assert_close(r.read(ids), want[ids], rtol=0, atol=0)
            on_disk = sum(p.stat().st_size for p in (cache / "objects").iterdir())
            assert on_disk <= cap
        c = remote.cache_counters(r.path)
        assert c["evicted_bytes"] > 0 and c["used_bytes"] <= cap
        # the newest chunks stayed: reading the last rows again is all hits
        misses = c["misses"]
        torch.testing.assert_close(r.read(torch.arange(ROWS - 16, ROWS)), want[-16:])
        assert remote.cache_counters(r.path)["misses"] == misses


def test_a_damaged_cache_entry_is_fetched_again_never_served(pub, tmp_path):
    url, opts, fs, want = pub
    cache = tmp_path / "cache"
    ids = torch.arange(0, ROWS, 37)
    with dpsn.open(url, storage_options=opts, cache_dir=cache, cache_rows=0) as r:
        r.read(ids)
    lazy = _lazy_objects(fs, url)
    cached = [p for p in (cache / "objects").iterdir() if p.name in lazy]
    assert cached
    for p in cached:  # flip a byte of every cached chunk
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    with dpsn.open(url, storage_options=opts, cache_dir=cache, cache_rows=0) as r:
        torch.testing.assert_close(r.read(ids), want[ids], rtol=0, atol=0)
        assert remote.cache_counters(r.path)["refetched"] == len(cached)
    # a damaged eager file (the index copy) is fetched again at the next open
    index = next(p for p in (cache / "commits").rglob("data.mdb"))
    data = bytearray(index.read_bytes())
    data[100] ^= 0xFF
    index.write_bytes(bytes(data))
    with dpsn.open(url, storage_options=opts, cache_dir=cache, cache_rows=0) as r:
        torch.testing.assert_close(r.read(ids), want[ids], rtol=0, atol=0)


def test_a_damaged_object_in_the_bucket_is_a_typed_error(bucket, tmp_path):
    url, opts, fs = bucket
    _published(tmp_path, url, opts)
    lazy = _lazy_objects(fs, url, "deltas/")
    bad = sorted(lazy)[0]
    fs.pipe_file(f"{url[5:]}/objects/{bad}", b"\0" * lazy[bad])
    with (
        dpsn.open(url, storage_options=opts, cache_dir=tmp_path / "cache", cache_rows=0) as r,
        pytest.raises(CorruptSegmentError, match="does not match its checksum"),
    ):
        r.read(torch.arange(ROWS))
    assert not (tmp_path / "cache" / "objects" / bad).exists()  # never cached either


def test_a_sharded_root_publishes_and_opens_read_only(bucket, tmp_path, monkeypatch):
    from dpsn.tools.cli import main as cli

    url, opts, _fs = bucket
    root = tmp_path / "root"
    dpsn.distributed.create_root(root, 10**9, 8, shards=3, generator=GEN)
    ids = torch.arange(300)
    base = dpsn.distributed.read_rows(root, ids)
    out = dpsn.distributed.publish(root, url, opts)
    assert out["global_commit"] == 1 and len(out["shards"]) == 3
    with dpsn.open(url, storage_options=opts, cache_dir=tmp_path / "cache") as r:
        assert r.global_commit.id == 1 and not r.writable
        torch.testing.assert_close(r.read(ids), base, rtol=0, atol=0)
    # a new global commit (one shard changed; reshard writes every shard anew), pushed by the
    # CLI; a publisher that dies before the root's HEAD leaves readers on global commit 1
    dpsn.distributed.reshard(root, 2)
    moved = dpsn.distributed.read_rows(root, ids)
    torch.testing.assert_close(moved, base, rtol=0, atol=0)

    real = remote._fs

    class DiesAtHead:
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def pipe_file(self, path, data):
            if path.endswith("/pool/HEAD"):
                raise ConnectionError("killed")
            return self.fs.pipe_file(path, data)

    monkeypatch.setattr(remote, "_fs", lambda u, o: (DiesAtHead(real(u, o)[0]), real(u, o)[1]))
    with pytest.raises(ConnectionError):
        dpsn.distributed.publish(root, url, opts)
    monkeypatch.undo()
    with dpsn.open(url, storage_options=opts, cache_dir=tmp_path / "cache") as r:
        assert r.global_commit.id == 1 and r.global_commit.count == 3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert cli(["push", str(root), url, "--endpoint-url", opts["endpoint_url"]]) == 0
    with dpsn.open(url, storage_options=opts, cache_dir=tmp_path / "cache") as r:
        assert r.global_commit.count == 2
        got = r.read(ids)
    np.testing.assert_array_equal(got.numpy(), base.numpy())


def test_a_running_job_publishes_its_global_commit(bucket, tmp_path):
    """``ShardedPool.publish`` (the collective), here in a one-rank gloo group."""
    import torch.distributed as dist

    url, opts, _fs = bucket
    root = tmp_path / "root"
    dpsn.distributed.create_root(root, 10**9, 8, shards=1, generator=GEN)
    store = dist.FileStore(str(tmp_path / "pg"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with dpsn.distributed.open(root, "r+") as pool:
            pool.local.write([1, 2], torch.ones(2, 8))
            pool.commit("rows")
            out = pool.publish(url, opts)
            assert out["global_commit"] == 2
            want = pool.read(torch.arange(10))
    finally:
        dist.destroy_process_group()
    with dpsn.open(url, storage_options=opts, cache_dir=tmp_path / "cache") as r:
        assert r.head == 2
        torch.testing.assert_close(r.read(torch.arange(10)), want, rtol=0, atol=0)


def _eager_bytes(fs, url, commit: int) -> int:
    """What an open of ``commit`` needs on disk (its index copy and metadata)."""
    import json

    rec = json.loads(fs.cat_file(f"{url[5:]}/published/{commit:016d}.json"))
    eager = {o for r, o in rec["files"].items() if not remote.is_lazy(r)} | {rec["index"]}
    return sum(remote._object_size(o) for o in eager)


def _two_commits(tmp_path, url, opts):
    """Commit 1 (rows 0..ROWS) and commit 2 (two rows changed), both published."""
    with dpsn.create(tmp_path / "s", 10**9, 8, generator=GEN, chunk_rows=16) as pool:
        g = torch.Generator().manual_seed(0)
        pool.write(torch.arange(ROWS), torch.randn(ROWS, 8, generator=g))
        pool.commit("rows")
        first = pool.publish(url, opts)["commit"]
        want1 = pool.read(torch.arange(ROWS))
        pool.write([1, 2], torch.full((2, 8), 7.0))
        pool.commit("more")
        pool.publish(url, opts)
        return first, want1, pool.read(torch.arange(ROWS))


# Another process checking the newest commit out into the same cache under a tight cap (the
# checkout is what an open does first; torch-free, so the process starts fast).
_EVICTOR = """
import json, sys
from dpsn.store import remote
url, opts, cache, cap = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
remote.checkout(url, opts, cache_dir=cache, cache_bytes=cap).hold.release()
"""


def test_an_open_reader_keeps_its_checkout_however_others_evict(bucket, tmp_path):
    """Readers hold their checkout: another pool of this process, and another process sharing
    the cache directory, evict around it (its rows stay readable, the same), and only once
    every reader closed is its space reclaimed."""
    import json
    import subprocess
    import sys

    url, opts, fs = bucket
    first, want1, want2 = _two_commits(tmp_path, url, opts)
    cache = tmp_path / "cache"
    tight = _eager_bytes(fs, url, first + 1)  # room for commit 2's open and nothing else
    ids = torch.arange(ROWS)

    def evict_in_another_process() -> None:
        args = [url, json.dumps(opts), str(cache), str(tight)]
        subprocess.run([sys.executable, "-c", _EVICTOR, *args], check=True, timeout=120)

    r1 = dpsn.open(url, at=first, storage_options=opts, cache_dir=cache, cache_rows=0)
    r1b = dpsn.open(url, at=first, storage_options=opts, cache_dir=cache, cache_rows=0)
    held = r1.path
    assert held == r1b.path and held in remote.held_checkouts()
    r1b.close()  # the other pool on the same checkout still holds it
    with dpsn.open(url, storage_options=opts, cache_dir=cache, cache_bytes=tight) as r2:
        torch.testing.assert_close(r2.read(ids), want2, rtol=0, atol=0)
    assert held.is_dir()
    evict_in_another_process()
    assert held.is_dir()
    # read only now: every segment's metadata and chunk is read after the evictions
    torch.testing.assert_close(r1.read(ids), want1, rtol=0, atol=0)
    evict_in_another_process()  # evicts the chunks r1 just read: they are fetched again
    torch.testing.assert_close(r1.read(ids), want1, rtol=0, atol=0)
    r1.close()
    assert held not in remote.held_checkouts()
    evict_in_another_process()
    assert not held.exists()  # reclaimed once no reader holds it
    on_disk = sum(p.stat().st_size for p in (cache / "objects").iterdir())
    assert on_disk <= tight


def test_a_warm_open_asks_the_bucket_for_head_alone(bucket, tmp_path, counting):
    """HEAD names its record's bytes: a cached copy that matches serves the open, a damaged
    one is fetched again, and a record in the bucket that is not the one HEAD names is a
    typed error."""
    import json

    from dpsn.errors import CorruptStoreError

    url, opts, fs = bucket
    want = _published(tmp_path, url, opts)
    cache = tmp_path / "cache"
    ids = torch.arange(0, ROWS, 7)
    with dpsn.open(url, storage_options=opts, cache_dir=cache, cache_rows=0) as r:
        r.read(ids)
    before = len(counting(every=True))
    with dpsn.open(url, storage_options=opts, cache_dir=cache, cache_rows=0) as r:
        torch.testing.assert_close(r.read(ids), want[ids], rtol=0, atol=0)
    asked = counting(every=True)[before:]
    assert len(asked) == 1 and asked[0].endswith("/pool/HEAD"), asked
    named = json.loads(fs.cat_file(url[5:] + "/HEAD"))["record"]
    (cache / "objects" / named).write_bytes(b"{}")  # damaged in the cache: fetched again
    before = len(counting(every=True))
    with dpsn.open(url, storage_options=opts, cache_dir=cache, cache_rows=0) as r:
        torch.testing.assert_close(r.read(ids), want[ids], rtol=0, atol=0)
    assert len(counting(every=True)[before:]) == 2
    (cache / "objects" / named).unlink()
    head = json.loads(fs.cat_file(url[5:] + "/HEAD"))["commit"]
    where = f"{url[5:]}/published/{head:016d}.json"
    rec = json.loads(fs.cat_file(where))
    rec["time"] += 1  # a different record at HEAD's commit: not the one HEAD names
    fs.pipe_file(where, json.dumps(rec).encode())
    with pytest.raises(CorruptStoreError, match="not the record"):
        dpsn.open(url, storage_options=opts, cache_dir=cache, cache_rows=0)


def test_gc_of_a_sharded_roots_bucket_keeps_what_retained_global_commits_name(
    bucket, tmp_path, monkeypatch, capsys
):
    """``remote.gc`` of a published sharded root: global records not retained go first, then
    each shard keeps the commits the retained global records name; HEAD's global commit stays
    whole and readable, an older one is gone."""
    from dpsn.errors import SnapshotNotFoundError

    url, opts, fs = bucket
    root = tmp_path / "root"
    dpsn.distributed.create_root(root, 10**9, 8, shards=2, generator=GEN)
    ids = torch.arange(300)
    base = dpsn.distributed.read_rows(root, ids)
    assert dpsn.distributed.publish(root, url, opts)["global_commit"] == 1
    dpsn.distributed.reshard(root, 3)  # a new global commit naming three new shard commits
    assert dpsn.distributed.publish(root, url, opts)["global_commit"] == 2
    prefix = url[5:]
    before = set(fs.find(prefix))

    every = remote.gc(url, opts, grace=0)  # no rule given: every commit kept, nothing to remove
    assert every["kept_commits"] == [1, 2] and every["removed_commits"] == []
    assert every["removed_objects"] == 0 and set(fs.find(prefix)) == before

    dry = remote.gc(url, opts, keep_last=1, grace=0, dry_run=True)
    assert dry["removed_commits"] == [1] and set(fs.find(prefix)) == before
    out = remote.gc(url, opts, keep_last=1, grace=0)
    assert out["head"] == 2 and out["kept_commits"] == [2] and out["removed_commits"] == [1]
    assert out["removed_objects"] == dry["removed_objects"] > 0
    gone = {d for d, o in out["shards"].items() if o.get("whole_store")}
    assert gone == {"shard-0000", "shard-0001"} and len(out["shards"]) == 5
    assert not any("/shard-0000/" in p or "/shard-0001/" in p for p in fs.find(prefix))
    assert not any(p.endswith("global/0000000000000001.json") for p in fs.find(prefix))
    with dpsn.open(url, storage_options=opts, cache_dir=tmp_path / "cache") as r:
        assert r.global_commit.id == 2 and r.global_commit.count == 3
        torch.testing.assert_close(r.read(ids), base, rtol=0, atol=0)
    with pytest.raises(SnapshotNotFoundError):
        dpsn.open(url, at=1, storage_options=opts, cache_dir=tmp_path / "c2")
    again = remote.gc(url, opts, keep_last=1, grace=0)
    assert again["removed_commits"] == [] and again["removed_objects"] == 0
    from dpsn.tools.cli import main as cli

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    capsys.readouterr()
    assert cli(["gc", url, "--dry-run", "--endpoint-url", opts["endpoint_url"]]) == 0
    said = capsys.readouterr().out
    assert "would remove 0 global commit(s)" in said and "kept global commits [1, 2]" not in said
    assert "kept global commits [2] (HEAD 2)" in said
