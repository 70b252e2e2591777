"""``dpsn.create`` and ``dpsn.open``: where configuration is validated and a Pool is built."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import torch

from dpsn._dtypes import parse_pool_dtype, storage_dtype
from dpsn.errors import (
    CacheTooLargeError,
    CorruptStoreError,
    DpsnError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    InvalidDeviceError,
    LifecycleError,
)
from dpsn.hypernet import GENERATORS, Generator, make_generator
from dpsn.store import (
    LayeredIndex,
    MaintenancePolicy,
    Manifest,
    PersistedStore,
    read_manifest,
    write_policy,
)
from dpsn.tiers import check_policy

from ._config import OpenOptions, StoreSpec, merge_object
from ._lifecycle import Lifecycle, initial_record
from ._pool import Pool

CHUNK_BYTES = 256 << 10  # ~256 KiB chunks: big enough to stream, small enough for random reads
MAX_CHUNK_BYTES = 256 << 20  # one chunk of a segment, decoded (readers refuse more than 1 GiB)
# What a cache slot costs beyond its rows (two columns of dim values): slot id and dirty flag
# (9 B), the sorted keys and slots (16 B), two slot-guess tables of >= 8 entries of 4 B (64 B).
# A lower bound: the policy adds its own (up to 256 B a row for TinyLFU).
CACHE_SLOT_OVERHEAD = 89


def check_device(device: str | torch.device | None) -> torch.device:
    """The device a pool's cache lives on: ``cpu``, or ``cuda[:N]`` where torch has CUDA and
    that GPU (``mps`` where torch has it). ``InvalidDeviceError`` (a ``ValueError``) else."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InvalidDeviceError(
            f"device={device!r} is not a device torch knows ({e}); use 'cpu' or 'cuda[:N]'"
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidDeviceError(
                f"device={device!r}, but this torch has no usable CUDA (a CPU-only build, or no "
                "GPU or driver); use device='cpu'"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and not 0 <= dev.index < count:
            raise InvalidDeviceError(
                f"device={device!r}, but this machine has {count} CUDA device(s): "
                f"cuda:0..cuda:{count - 1}"
            )
        return dev
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    raise InvalidDeviceError(
        f"device={device!r}: dpsn keeps its cache on 'cpu' or 'cuda' (or 'mps' where available)"
    )


def device_memory(device: torch.device) -> int:
    """Total memory of ``device`` in bytes: the bound no cache can pass."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 50


def check_cache_args(
    device: str | torch.device | None,
    cache_rows: int | None,
    dim: int,
    dtype: str | torch.dtype,
) -> tuple[torch.device, int | None]:
    """Check a pool's ``device=`` and ``cache_rows=`` before any store is written or opened:
    the device must exist here, ``cache_rows`` be None (the default size) or an int >= 0 whose
    cache fits the device's memory. Returns them normalised; raises ``InvalidDeviceError``,
    ``InvalidArgumentError`` (both ``ValueError``) or ``CacheTooLargeError`` (also a
    ``MemoryError``), which names the size."""
    dev = check_device(device)
    if cache_rows is None:
        return dev, None
    if isinstance(cache_rows, bool) or not isinstance(cache_rows, int) or cache_rows < 0:
        raise InvalidArgumentError(
            f"cache_rows must be None (about 64 MiB), 0 (no cache) or a positive int; "
            f"got {cache_rows!r}"
        )
    name = parse_pool_dtype(dtype)
    itemsize = storage_dtype(name).itemsize
    per_row = 2 * dim * itemsize + CACHE_SLOT_OVERHEAD
    need = cache_rows * per_row
    have = device_memory(dev)
    if need > have:
        raise CacheTooLargeError(
            f"cache_rows={cache_rows} needs at least {_size(need)} on {dev} ({per_row} bytes a "
            f"row at dim {dim}, {name}), but it has {_size(have)}; use at most "
            f"cache_rows={have // per_row}, or cache_rows=None for about 64 MiB"
        )
    return dev, cache_rows


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.4g} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _default_chunk_rows(dim: int, itemsize: int) -> int:
    rows = max(1, CHUNK_BYTES // (dim * itemsize))
    return 1 << (rows.bit_length() - 1)


def _build_generator(generator: Any, *, dim: int, seed: int, rows: int) -> Generator:
    if isinstance(generator, Generator):
        if generator.dim != dim or generator.seed != seed:
            raise InvalidArgumentError(
                f"generator was built for dim={generator.dim}, seed={generator.seed}; "
                f"the pool has dim={dim}, seed={seed}"
            )
        if getattr(generator, "takes_rows", False) and generator.rows != rows:
            raise InvalidArgumentError(
                f"generator was built for rows={generator.rows}; the pool has rows={rows}"
            )
        return generator
    if isinstance(generator, str | dict):
        config = {"kind": generator} if isinstance(generator, str) else dict(generator)
        kind = config.pop("kind", None)
        if not isinstance(kind, str):
            raise InvalidArgumentError(
                f"a generator spec needs a 'kind' (one of {sorted(GENERATORS)})"
            )
        if getattr(GENERATORS.get(kind), "takes_rows", False):  # regions of ids: the pool's
            config.setdefault("rows", rows)
        try:
            return make_generator(kind, dim=dim, seed=seed, **config)
        except DpsnError:
            raise
        except (TypeError, ValueError) as e:  # an unknown kind, or options it refuses
            raise InvalidArgumentError(f"generator={generator!r}: {e}") from e
    raise InvalidArgumentTypeError(
        f"generator= takes a kind name, a dict with 'kind', or a Generator; got {generator!r}"
    )


def create(
    path: str | os.PathLike[str],
    rows: int | None = None,
    dim: int | None = None,
    *,
    spec: StoreSpec | None = None,
    options: OpenOptions | None = None,
    maintenance: MaintenancePolicy | None = None,
    base: str | os.PathLike[str] | None = None,
    base_at: str | int | None = None,
    seed: int = 0,
    generator: str | dict[str, Any] | Generator = "hashed_slices",
    dtype: str | torch.dtype = torch.float32,
    chunk_rows: int | None = None,
    compressor: Literal["lz4", "zstd", "none"] = "lz4",
    device: str | torch.device | None = None,
    cache_rows: int | None = None,
    policy: str = "lru",
    map_size: int | None = None,
    keep_last: int | None = None,
    keep_within: float | str | None = None,
    compact_above: float | None = 1.5,
    lifecycle: Lifecycle | None = None,
    shards: int | None = None,
    process_group: Any = None,
    levels: Any = None,
    model_id: str | None = None,
    config: dict[str, Any] | None = None,
    migration: Any = None,
) -> Pool:
    """Create a store at ``path`` and return it open for writing (``mode="r+"``).

    ``rows`` may be up to 2**63-1; rows are virtual until written, so a 10**12-row pool costs
    the generator's weights and nothing else. ``seed`` fixes every base row. ``generator`` is a
    kind name (``"hashed_slices"``, ``"rf_mlp"``, ``"region_mlp"``: its ``rows`` is filled
    in), a dict ``{"kind": ..., **config}`` or a Generator module. The store's first commit
    (id 1, message "create") records the spec and the generator weights. ``device``,
    ``cache_rows`` and ``policy`` configure the device cache as in :func:`open`.
    ``lifecycle`` (a :class:`dpsn.Lifecycle`) gives the store a row lifecycle, saved with
    every commit from the first on.

    History and compaction (changeable later with ``Pool.set_policy``): ``gc`` and compaction
    keep HEAD, every snapshot, the ``keep_last`` newest commits and/or those younger than
    ``keep_within`` (seconds or ``"7d"``); neither set keeps HEAD and snapshots only. After a
    commit the store compacts itself when its segments hold more than ``compact_above`` times
    the live bytes (None: only ``Pool.compact()``).

    The same settings come whole as objects (see ``dpsn.StoreSpec``): ``spec=`` (what the store
    is: rows, dim, seed, generator, dtype, chunk_rows, compressor, map_size), ``options=`` (how
    this process serves it: device, cache_rows, policy) and ``maintenance=`` (a
    ``dpsn.MaintenancePolicy``); a setting given both ways is refused.

    Every argument is checked before anything is written. ``path`` must be new or an empty
    directory; two processes creating one path cannot both succeed (the loser gets a
    ``StoreExistsError``), and a create that fails (a full disk is a ``StoreFullError``) leaves
    the path as it found it.

    ``shards=N`` or ``process_group=`` create a sharded root instead (one store per rank under
    ``path``): see :func:`dpsn.distributed.create`.

    ``levels`` (names or :class:`dpsn.Level`, slowest first) creates a levelled store instead
    (see docs/levels.md), with ``model_id``, ``config`` and ``migration`` (a
    :class:`dpsn.Migration`) in its provenance; ``levels=None`` keeps the single-level store.

    Overlays: ``base=`` another store's path makes an overlay: its rows read the base's rows at
    ``base_at`` (a snapshot name or commit id of the base; default its HEAD) plus the overlay's
    own deltas, and the base is never written. ``rows``, ``dim``, ``seed``, ``generator``,
    ``dtype``, ``chunk_rows`` and ``compressor`` then come from the base (leave them out, or
    give the base's). See docs/overlays.md for pinning and sharing.
    """
    if base_at is not None and base is None:
        raise InvalidArgumentError("base_at= needs base= (the store the overlay reads)")
    spec_given = {
        "rows": rows,
        "dim": dim,
        "seed": seed,
        "generator": generator,
        "dtype": dtype,
        "chunk_rows": chunk_rows,
        "compressor": compressor,
        "map_size": map_size,
    }
    spec_defaults = {
        "rows": None,
        "dim": None,
        "seed": 0,
        "generator": "hashed_slices",
        "dtype": torch.float32,
        "chunk_rows": None,
        "compressor": "lz4",
        "map_size": None,
    }
    open_given = {"device": device, "cache_rows": cache_rows, "policy": policy}
    open_defaults = {"device": None, "cache_rows": None, "policy": "lru"}
    keep_given = {
        "keep_last": keep_last,
        "keep_within": keep_within,
        "compact_above": compact_above,
    }
    keep_defaults = {"keep_last": None, "keep_within": None, "compact_above": 1.5}
    sharded = shards is not None or process_group is not None
    levelled = levels is not None or model_id is not None or config is not None
    levelled = levelled or migration is not None
    dispatch = sharded or levelled
    if sharded and levelled:
        raise InvalidArgumentError(
            "a sharded root has no levels: leave out levels=, model_id=, config= and "
            "migration= with shards= / process_group="
        )
    if dispatch or base is not None:
        # the objects are checked (type, and no setting given both ways) on every path
        if spec is not None:
            spec = merge_object(StoreSpec, spec, spec_given, spec_defaults, "spec")
            rows, dim, seed, generator = spec.rows, spec.dim, spec.seed, spec.generator
            dtype, chunk_rows, compressor = spec.dtype, spec.chunk_rows, spec.compressor
            map_size = spec.map_size
        if options is not None:
            options = merge_object(OpenOptions, options, open_given, open_defaults, "options")
            device, cache_rows, policy = options.device, options.cache_rows, options.policy
        if maintenance is not None:
            merge_object(MaintenancePolicy, maintenance, keep_given, keep_defaults, "maintenance")
            keep_last, keep_within = maintenance.keep_last, maintenance.keep_within
            compact_above = maintenance.compact_above
        if base is not None:
            if dispatch:
                raise InvalidArgumentError(
                    "an overlay (base=) is a single-level, unsharded store: leave out shards=, "
                    "process_group= and levels="
                )
            given = (
                {k: v for k, v in spec_given.items() if v is not None and v != spec_defaults[k]}
                if spec is None
                else {k: getattr(spec, k) for k in spec_given}
            )
            return _create_overlay(
                path,
                base,
                base_at,
                given=given,
                device=device,
                cache_rows=cache_rows,
                policy=policy,
                map_size=map_size,
                maintenance=(keep_last, keep_within, compact_above),
                lifecycle=lifecycle,
            )
        if shards is not None or process_group is not None:
            from ._sharded_api import create as create_sharded

            return create_sharded(  # type: ignore[return-value]
                path, rows, dim, shards=shards, process_group=process_group, seed=seed,
                generator=generator, dtype=dtype, chunk_rows=chunk_rows, compressor=compressor,
                device=device, cache_rows=cache_rows, policy=policy, map_size=map_size,
                keep_last=keep_last, keep_within=keep_within, compact_above=compact_above,
                lifecycle=lifecycle,
            )  # fmt: skip
        from ._levels import create_levelled  # levels: an additive layer over this function

        if levels is None or lifecycle is not None:
            raise InvalidArgumentError(
                "model_id=, config= and migration= need levels=[...]; a levelled store takes "
                "a lifecycle per level (dpsn.Level(name, lifecycle=...)), not lifecycle="
            )
        args = dict(seed=seed, generator=generator, dtype=dtype, chunk_rows=chunk_rows)
        args.update(compressor=compressor, device=device, cache_rows=cache_rows, policy=policy)
        args.update(map_size=map_size, keep_last=keep_last, keep_within=keep_within)
        return create_levelled(  # type: ignore[return-value]
            path, rows, dim, levels=levels, model_id=model_id, config=config,
            migration=migration, create=create, compact_above=compact_above, **args,
        )  # fmt: skip
    if spec is None and (rows is None or dim is None):
        raise InvalidArgumentTypeError(
            "dpsn.create needs rows and dim, or spec=dpsn.StoreSpec(...)"
        )
    spec = merge_object(StoreSpec, spec, spec_given, spec_defaults, "spec")
    options = merge_object(OpenOptions, options, open_given, open_defaults, "options")
    if maintenance is None:
        maintenance = MaintenancePolicy().with_(
            keep_last=keep_last, keep_within=keep_within, compact_above=compact_above
        )
    else:
        merge_object(MaintenancePolicy, maintenance, keep_given, keep_defaults, "maintenance")
    rows, dim, seed, map_size = spec.rows, spec.dim, spec.seed, spec.map_size
    device, cache_rows, policy = options.device, options.cache_rows, options.policy
    if lifecycle is not None and not isinstance(lifecycle, Lifecycle):
        raise InvalidArgumentTypeError(
            f"lifecycle= takes a dpsn.Lifecycle, got {type(lifecycle).__name__}"
        )
    if lifecycle is not None and lifecycle.regions > rows:
        raise LifecycleError(f"Lifecycle.regions={lifecycle.regions} exceeds rows={rows}")
    dtype_name = parse_pool_dtype(spec.dtype)
    itemsize = storage_dtype(dtype_name).itemsize
    chunk_rows = spec.chunk_rows
    if chunk_rows is None:
        chunk_rows = _default_chunk_rows(dim, itemsize)
    if chunk_rows * dim * itemsize > MAX_CHUNK_BYTES:
        raise InvalidArgumentError(
            f"chunk_rows={chunk_rows} makes chunks of {chunk_rows * dim * itemsize} bytes; "
            f"keep chunk_rows * dim * itemsize at most {MAX_CHUNK_BYTES}"
        )
    device, cache_rows = check_cache_args(device, cache_rows, dim, dtype_name)
    gen = _build_generator(spec.generator, dim=dim, seed=seed, rows=rows)
    manifest = Manifest(
        rows=rows,
        dim=dim,
        dtype=dtype_name,
        seed=seed,
        generator={"kind": gen.kind, "config": gen.config()},
        chunk_rows=chunk_rows,
        compressor=spec.compressor,
        created=time.time(),
        uuid=uuid.uuid4().hex,
    )
    state = {k: v.detach().cpu().float().numpy() for k, v in gen.state_dict().items()}
    kwargs: dict[str, Any] = {} if map_size is None else {"map_size": map_size}
    if lifecycle is not None:
        kwargs["lifecycle"] = initial_record(lifecycle)
    # Everything above touched no disk; from here a failure removes what create made.
    store = PersistedStore.create(Path(path), manifest, state, **kwargs)
    return _first_pool(store, maintenance, device, cache_rows, policy)


def _create_overlay(
    path: str | os.PathLike[str],
    base: str | os.PathLike[str],
    base_at: str | int | None,
    *,
    given: dict[str, Any],
    device: Any,
    cache_rows: int | None,
    policy: str,
    map_size: int | None,
    maintenance: tuple[Any, Any, Any],
    lifecycle: Lifecycle | None,
) -> Pool:
    from ._overlay import check_overlay_spec, create_overlay_store

    if base_at is not None and (isinstance(base_at, bool) or not isinstance(base_at, str | int)):
        raise InvalidArgumentTypeError(
            f"base_at= takes a snapshot name or a commit id, not {type(base_at).__name__}"
        )
    check_policy(policy)
    if lifecycle is not None and not isinstance(lifecycle, Lifecycle):
        raise InvalidArgumentTypeError(
            f"lifecycle= takes a dpsn.Lifecycle, got {type(lifecycle).__name__}"
        )
    keep_last, keep_within, compact_above = maintenance
    policy_obj = MaintenancePolicy().with_(
        keep_last=keep_last, keep_within=keep_within, compact_above=compact_above
    )
    bm = read_manifest(Path(base))
    check_overlay_spec(bm, given, _build_generator)  # an overlay has its base's spec
    device, cache_rows = check_cache_args(device, cache_rows, bm.dim, bm.dtype)
    kwargs: dict[str, Any] = {} if map_size is None else {"map_size": map_size}
    if lifecycle is not None:
        kwargs["lifecycle"] = initial_record(lifecycle)
    store = create_overlay_store(Path(path), base, base_at, **kwargs)
    return _first_pool(store, policy_obj, device, cache_rows, policy)


def _first_pool(
    store: PersistedStore,
    maintenance: MaintenancePolicy,
    device: torch.device,
    cache_rows: int | None,
    policy: str,
) -> Pool:
    """The new store's maintenance policy written and its pool at commit 1; a failure removes
    what create made (``store.discard()``)."""
    try:
        write_policy(store, maintenance)
        return Pool(
            store,
            commit=1,
            index=LayeredIndex.empty(),
            device=device,
            cache_rows=cache_rows,
            policy=policy,
        )
    except BaseException:
        store.discard()
        raise


def _url_scope(fn: Any) -> Any:
    """Keep a URL's checkouts held until the open returns (``remote.open_scope``): by then
    the stores it opened hold them, and close releases them."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from dpsn.store import remote

        with remote.open_scope():
            return fn(*args, **kwargs)

    return wrapper


@_url_scope
def open(  # mirrors zarr.open / builtins.open, as users expect
    path: str | os.PathLike[str],
    mode: Literal["r", "r+"] = "r",
    *,
    at: str | int | None = None,
    options: OpenOptions | None = None,
    device: str | torch.device | None = None,
    cache_rows: int | None = None,
    policy: str = "lru",
    lifecycle: Lifecycle | None = None,
    process_group: Any = None,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_bytes: int | None = None,
) -> Pool:
    """Open a store.

    ``mode="r"`` reads the newest commit (or ``at=``, a snapshot name or a commit id) and keeps
    seeing it until ``refresh()``; ``mode="r+"`` also takes the store's single writer lock.
    Rows are served through a cache of ``cache_rows`` rows on ``device`` (CUDA when asked for,
    else CPU) with eviction ``policy`` (``"lru"``, ``"lfu"``); ``cache_rows=None`` sizes it to
    about 64 MiB, ``cache_rows=0`` reads without a cache. ``lifecycle`` (a
    :class:`dpsn.Lifecycle`) replaces the row lifecycle saved in the store (saved at the next
    commit), or gives one to a store without; None keeps the saved one. ``options=`` (a
    ``dpsn.OpenOptions``) gives device, cache_rows and policy as one object instead.

    A sharded root (or ``process_group=``) opens this rank's shard as a
    :class:`dpsn.distributed.ShardedPool`: see :func:`dpsn.distributed.open`.

    A URL (``s3://bucket/prefix``; credentials and endpoint in ``storage_options``, fsspec's,
    or the environment) opens the commit a writer published there (``Pool.publish``,
    ``dpsn push``) read-only, through a local disk cache (``cache_dir``, default
    ``~/.cache/dpsn``; at most ``cache_bytes``, default 8 GiB): ``dpsn.store.remote``.
    """
    from dpsn.store import remote
    from dpsn.store import shards as layout

    if remote.is_url(path):
        if mode != "r":
            raise InvalidArgumentError(
                'a published store opens read-only (mode="r"): write locally, then publish'
            )
        if at is not None and (isinstance(at, (str, bool))):
            raise InvalidArgumentTypeError("at= of a published store takes a commit id (int)")
        path = remote.materialize(
            str(path),
            storage_options,
            at=None if at is None else int(at),
            cache_dir=cache_dir,
            cache_bytes=remote.DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes,
        )
        at, from_url = None, True
    else:
        from_url = False
    options = merge_object(
        OpenOptions,
        options,
        {"device": device, "cache_rows": cache_rows, "policy": policy},
        {"device": None, "cache_rows": None, "policy": "lru"},
        "options",
    )
    device, cache_rows, policy = options.device, options.cache_rows, options.policy
    if process_group is not None or layout.is_sharded(path):
        from ._sharded_api import open as open_sharded

        return open_sharded(  # type: ignore[return-value]
            path, mode, process_group=process_group, at=at, device=device,
            cache_rows=cache_rows, policy=policy, lifecycle=lifecycle, alone_ok=from_url,
        )  # fmt: skip
    if mode not in ("r", "r+"):
        raise InvalidArgumentError(f'mode must be "r" or "r+", got {mode!r}')
    from ._levels import is_levelled, open_levelled  # levels: an additive layer over open

    if is_levelled(path):
        if lifecycle is not None:
            raise InvalidArgumentError(
                f"{path} is a levelled store: each level keeps the lifecycle it was created "
                "with (dpsn.Level(name, lifecycle=...)); open it without lifecycle="
            )
        return open_levelled(  # type: ignore[return-value]
            path, mode, at=at, open=open, create=create, device=device,
            cache_rows=cache_rows, policy=policy,
        )  # fmt: skip
    if at is not None and (
        isinstance(at, bool) or not (isinstance(at, str) or hasattr(type(at), "__index__"))
    ):
        raise InvalidArgumentTypeError(
            f"at= takes a snapshot name (str) or a commit id (int), not {type(at).__name__}"
        )
    if at is not None and mode != "r":
        raise InvalidArgumentError(
            'a past commit (at=...) can only be opened read-only: use mode="r"'
        )
    check_cache_args(device, cache_rows, 1, torch.float16)  # before the store is opened
    store = PersistedStore.open(Path(path), writable=mode == "r+")
    try:
        m = store.manifest
        device, cache_rows = check_cache_args(device, cache_rows, m.dim, m.dtype)
        if at is None:
            commit, index = store.load_head()
        else:
            commit = store.resolve(at)
            index = store.load_index(commit)
        store.hold(commit, index)  # a reader's lease: gc elsewhere keeps this commit
        return Pool(
            store,
            commit=commit,
            index=index,
            device=device,
            cache_rows=cache_rows,
            policy=policy,
            lifecycle=lifecycle,
        )
    except BaseException:
        store.close()
        raise


def compact(
    path: str | os.PathLike[str], *, progress: Any = None, target: float = 1.1
) -> dict[str, Any]:
    """Compact the store at ``path`` (takes the writer lock): see ``Pool.compact``. Needs no
    generator or cache, so it costs what it rewrites. Rows are placed by the co-use statistics
    saved with HEAD, if any (``Pool.compact``)."""
    from . import _couse_files

    store = PersistedStore.open(Path(path), writable=True)
    try:
        try:
            sketch = _couse_files.load(store.root, store.head(), store.manifest.rows)
        except CorruptStoreError:  # advice lost (verify reports it, repair deletes it)
            sketch = None
        placement = sketch.placement if sketch is not None and len(sketch) else None
        return store.compact(progress=progress, target=target, placement=placement).to_json()
    finally:
        store.close()


def gc(
    path: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    progress: Any = None,
    **retention: Any,
) -> dict[str, Any]:
    """``gc`` of the store at ``path`` (takes the writer lock, but for a ``dry_run``, which
    changes nothing and works beside a writer): see ``Pool.gc``."""
    store = PersistedStore.open(Path(path), writable=not dry_run)
    try:
        return store.gc(dry_run=dry_run, progress=progress, **retention)
    finally:
        store.close()
