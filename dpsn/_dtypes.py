"""The one table of dtypes dpsn persists, and how each is stored.

Zarr has no bfloat16, so bfloat16 goes to disk as its 16-bit patterns in ``uint16`` (pool
segments and routers alike; routers written before this table existed used ``int16`` and are
still read). Names are persisted in manifests and router manifests: never rename one.

Torch is imported lazily, so code that only inspects stores (the CLI's ``info``) can use the
storage half of the table without it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from dpsn.errors import InvalidArgumentTypeError

if TYPE_CHECKING:
    import torch

# name -> numpy dtype of the stored values (little-endian)
STORAGE: dict[str, np.dtype] = {
    "bool": np.dtype("bool"),
    "uint8": np.dtype("uint8"),
    "int8": np.dtype("int8"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),  # the bits: zarr has no bfloat16
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}
POOL_DTYPES = ("float32", "float16", "bfloat16")  # what a pool's rows may be
FLOATS = frozenset({"float16", "bfloat16", "float32", "float64"})
LEGACY_STORAGE = {"bfloat16": (np.dtype("<i2"),)}  # also accepted when reading


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype values of dtype ``name`` are stored as; ``KeyError`` if unknown."""
    return STORAGE[name]


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def dtype_name(dtype: Any) -> str:
    """The table's name of a torch dtype or a name; ``TypeError`` naming the choices."""
    import torch

    if isinstance(dtype, str) and dtype in STORAGE:
        return dtype
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
        if name in STORAGE:
            return name
    raise TypeError(f"dtype {dtype!r} is not one dpsn stores; use one of {', '.join(STORAGE)}")


def parse_pool_dtype(dtype: Any) -> str:
    """A pool dtype's name (``float32``, ``float16``, ``bfloat16``) from a name or torch dtype."""
    try:
        name = dtype_name(dtype)
    except TypeError:
        name = None
    if name not in POOL_DTYPES:
        raise InvalidArgumentTypeError(
            f"dtype {dtype!r} is not supported; use one of {', '.join(POOL_DTYPES)}"
        )
    return name


def to_storage(values: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the numpy array it is stored as (bfloat16 as its uint16 bits)."""
    import torch

    values = values.detach().cpu().contiguous()
    if values.dtype == torch.bfloat16:
        return values.view(torch.int16).numpy().view(np.uint16)
    return values.numpy()


def from_storage(values: np.ndarray, name: str) -> torch.Tensor:
    """Stored values back as a tensor of dtype ``name`` (shares memory where it can)."""
    import torch

    if name == "bfloat16":
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def storage_reader(name: str) -> Callable[[np.ndarray], torch.Tensor]:
    """:func:`from_storage` for pool dtype ``name``, chosen once by a reader that converts many
    arrays: ``torch.from_numpy`` itself where the stored array already has the tensor's dtype
    (every pool dtype but bfloat16), so each read converts without a dispatch on the name."""
    import torch

    if name == "bfloat16":
        return functools.partial(from_storage, name=name)
    return torch.from_numpy
