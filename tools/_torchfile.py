"""``dpsn import emb.pt``: tables saved with ``torch.save`` (a tensor or a state dict), which
is what PyTorch users have.

A ``.pt`` file is a pickle inside a zip archive, so it is read only with
``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which builds tensors and
plain containers and refuses any other object (a file that would run code fails to load). The
file is memory-mapped (``mmap=True``), so a large table is read in slices, as safetensors are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ZIP_MAGIC = b"PK\x03\x04"


def is_torch_file(path: Path, magic: bytes) -> bool:
    """A ``torch.save`` archive (zip) or a file named like one."""
    return magic[:4] == ZIP_MAGIC or path.suffix in (".pt", ".pth")


def _tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """name -> tensor of a loaded object: a tensor (named ``weight``) or a (nested) dict."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix or "weight": obj}
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str):
                out.update(_tensors(v, f"{prefix}.{k}" if prefix else k))
    return out


def open_torch_table(path: Path, tensor: str | None, ids_name: str | None) -> Any:
    """The table of a ``torch.save`` file as a ``dpsn.tools._transfer.Table``."""
    import numpy as np
    import torch

    from ._transfer import Table, TransferError, _check_shape

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        # The restricted loader refuses other objects with an UnpicklingError (matched by name:
        # naming the class would import the unpickler this module keeps out of the library).
        if type(e).__name__ == "UnpicklingError":
            first = str(e).strip().splitlines()[0] if str(e).strip() else "refused"
            raise TransferError(
                f"{path} holds more than tensors ({first[:120]}); dpsn loads .pt files with "
                "torch.load(weights_only=True) only. Save the table itself: "
                "torch.save(emb.state_dict(), path)"
            ) from None
        if isinstance(e, RuntimeError | OSError | ValueError | EOFError):
            raise TransferError(f"{path} is not a readable torch.save file: {e}") from None
        raise
    found = _tensors(obj)
    if not found:
        raise TransferError(f"{path} holds no tensors (a tensor or a state dict is expected)")
    two_d = [k for k, t in found.items() if t.dim() == 2]
    if tensor is None:
        weights = [k for k in two_d if k == "weight" or k.endswith(".weight")]
        if len(weights) == 1:
            tensor = weights[0]
        elif len(two_d) == 1:
            tensor = two_d[0]
        else:
            listed = ", ".join(f"{k} {list(found[k].shape)}" for k in (two_d or found))
            raise TransferError(
                f"{path} holds several tensors ({listed}); pick the table with --tensor NAME"
            )
    if tensor not in found:
        raise TransferError(f"{path} has no tensor {tensor!r}; it holds: {', '.join(found)}")
    t = found[tensor]
    dtype = str(t.dtype).removeprefix("torch.")
    _check_shape(path, tuple(t.shape), dtype, name=tensor)
    ids = None
    want = ids_name if ids_name is not None else ("ids" if "ids" in found else None)
    if want:
        i = found.get(want)
        if i is None:
            raise TransferError(f"{path} has no tensor {want!r} for --ids")
        if i.dtype != torch.int64 or tuple(i.shape) != (t.shape[0],):
            raise TransferError(
                f"{path}: ids tensor {want!r} must be int64 of shape ({t.shape[0]},), not "
                f"{i.dtype} {list(i.shape)}"
            )
        ids = i.numpy().copy()
        if len(ids) and (np.any(np.diff(ids) <= 0) or ids[0] < 0):
            raise TransferError(f"{path}: ids tensor {want!r} must be sorted, unique, >= 0")
    return Table(path, tuple(t.shape), dtype, tensor, ids, {}, t.detach())
