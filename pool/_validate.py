"""Checks on what users hand to a pool. Errors name the problem and the fix."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dpsn.errors import InvalidDeltaError, InvalidIdsError, RowIdOutOfRangeError

MAX_ROWS = (1 << 63) - 1


def as_ids(ids: Any, rows: int) -> torch.Tensor:
    """``ids`` as an int64 CPU tensor of any shape, every id in ``[0, rows)``."""
    if isinstance(ids, int) and not isinstance(ids, bool):
        ids = [ids]
    if isinstance(ids, torch.Tensor) and ids.device.type == "meta":
        raise InvalidIdsError(
            "row ids are on the meta device, which holds shapes but no values; pass real ids"
        )
    if isinstance(ids, np.ndarray):
        if not np.issubdtype(ids.dtype, np.integer):
            raise InvalidIdsError(f"row ids must be integers, got a numpy array of {ids.dtype}")
        ids = torch.from_numpy(np.ascontiguousarray(ids.astype(np.int64, copy=False)))
    elif not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise InvalidIdsError(f"row ids must be integers: {e}") from e
        if ids.numel() == 0:
            ids = ids.to(torch.int64)
    if ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
        raise InvalidIdsError(
            f"row ids must be an integer tensor, got {ids.dtype}; convert with ids.long()"
        )
    if ids.dtype == torch.uint64:
        raise InvalidIdsError("row ids must be int64 (uint64 ids cannot be checked for range)")
    ids = ids.detach().to("cpu", torch.int64)
    if ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= rows:
            bad = lo if lo < 0 else hi
            raise RowIdOutOfRangeError(
                f"row id {bad} is out of range: this pool has ids 0..{rows - 1}"
            )
    return ids


def as_deltas(deltas: Any, ids_shape: torch.Size, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Deltas as a CPU tensor of the pool's dtype, shape ``[*ids.shape, dim]``, all finite."""
    if isinstance(deltas, np.ndarray):
        deltas = torch.from_numpy(np.ascontiguousarray(deltas))
    if not isinstance(deltas, torch.Tensor):
        raise InvalidDeltaError(
            f"deltas must be a tensor or numpy array, got {type(deltas).__name__}"
        )
    if deltas.device.type == "meta":
        raise InvalidDeltaError(
            "deltas are on the meta device, which holds shapes but no values; pass real ones"
        )
    if not deltas.is_floating_point():
        raise InvalidDeltaError(
            f"deltas must be floating point, got {deltas.dtype}; the pool stores {dtype}"
        )
    want = (*ids_shape, dim)
    if tuple(deltas.shape) != want:
        raise InvalidDeltaError(
            f"deltas have shape {tuple(deltas.shape)}, expected {want} (ids.shape + (dim={dim},))"
        )
    out = deltas.detach().to("cpu", dtype).reshape(-1, dim)
    if not torch.isfinite(deltas).all():
        raise InvalidDeltaError("deltas contain NaN or Inf; nothing was staged")
    if not torch.isfinite(out).all():
        raise InvalidDeltaError(f"deltas overflow {dtype} (values too large); nothing was staged")
    return out
