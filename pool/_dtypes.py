"""Pool dtypes and their stored form (zarr has no bfloat16: it is stored as uint16 bits)."""

from __future__ import annotations

import numpy as np
import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> str:
    for name, td in DTYPES.items():
        if dtype in (name, td):
            return name
    raise TypeError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")


def to_storage(values: torch.Tensor) -> np.ndarray:
    if values.dtype == torch.bfloat16:
        return values.contiguous().view(torch.int16).numpy().view(np.uint16)
    return values.contiguous().numpy()


def from_storage(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)
