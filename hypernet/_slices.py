"""Hashed slices: rows assembled from one shared trainable array (HashedNets / ROBE-Z).

Why: a pool of 10**12 virtual rows needs base values that cost no storage per row and almost no
compute. Following HashedNets (Chen et al., ICML 2015) and ROBE-Z (Desai et al., MLSys 2022),
every row reads ``ceil(dim / slice_size)`` contiguous slices of one array ``memory`` at hashed
offsets; a hashed sign per slice decorrelates rows that share a slice (HashedNets' sign hash).
Reading whole slices instead of single hashed elements keeps memory access contiguous (ROBE-Z's
point) and keeps the hash work per row small.

Row formula (part of a store's meaning: never change it, add a new kind instead)::

    bits[j]   = stream_bits(id, derive_seed(seed, 0), n_slices)[j]     (see _features)
    offset[j] = (bits[j] & (2**63 - 1)) % (memory_size - S + 1)         S = min(slice_size, dim)
    sign[j]   = -1 if bits[j] < 0 else +1                               (+1 when not signed)
    row[d]    = sign[d // S] * memory[offset[d // S] + d % S]            d = 0 .. dim-1

Slices never wrap around the end of ``memory`` (unlike ROBE's circular array): the first and last
``S - 1`` elements are read a little less often, which costs nothing measurable for
``memory_size >> S`` and saves a modulo per element.

Speed: the forward pass gathers from an overlapping ``[memory_size - S + 1, S]`` strided view of
``memory``, one ``index_select`` driven by ``[n, n_slices]`` offsets, never an ``[n, dim]`` index
tensor. Autograd cannot differentiate through an overlapping view efficiently, so the gather is
a custom function whose backward scatters into a dense gradient of ``memory`` (non-zero only at
positions some row read).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ._features import stream_bits
from ._generator import Generator
from ._hash import derive_seed
from ._init import hashed_normal_init

__all__ = ["HashedSlices"]

# Hash streams of this kind (derive_seed(seed, stream)): persisted in effect, never renumber.
_STREAM_OFFSETS = 0
_STREAM_INIT = 1

_INT64_MAX = (1 << 63) - 1


class _GatherSlices(torch.autograd.Function):
    """``out[i, :] = memory[offsets[i] : offsets[i] + size]`` with a scatter backward.

    ``offsets`` is 1-D; the output is a fresh ``[len(offsets), size]`` tensor (not a view, so the
    caller may scale it in place).
    """

    @staticmethod
    def forward(ctx: Any, memory: torch.Tensor, offsets: torch.Tensor, size: int) -> torch.Tensor:
        windows = memory.as_strided((memory.numel() - size + 1, size), (1, 1))
        ctx.save_for_backward(offsets)
        ctx.size = size
        ctx.memory_numel = memory.numel()
        return windows.index_select(0, offsets)  # (n * k, S)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (offsets,) = ctx.saved_tensors
        ar = torch.arange(ctx.size, dtype=torch.int64, device=offsets.device)
        index = (offsets.unsqueeze(-1) + ar).view(-1)  # (n * k * S)
        grad_memory = torch.zeros(ctx.memory_numel, dtype=grad.dtype, device=grad.device)
        grad_memory.index_add_(0, index, grad.reshape(-1))
        return grad_memory, None, None


class HashedSlices(Generator):
    """Rows of ``dim`` floats read as hashed, signed slices of one shared array.

    Axes: ``n`` ids, ``k = ceil(dim / S)`` slices per row, ``S`` floats per slice.

    Args:
        dim: row width.
        seed: fixes offsets, signs and the initial ``memory`` (nothing else is random).
        memory_size: floats in the shared array (the only parameters); 4 bytes each.
        slice_size: floats per slice; capped at ``dim``. Larger slices mean fewer hashes and
            more contiguous reads, but rows that share one slice share more.
        std: standard deviation of the initial ``memory`` (default ``1 / sqrt(dim)``, so
            ``x . row`` is O(|x| / sqrt(dim)) at start).
        signed: multiply each slice by a hashed +-1.
    """

    kind = "hashed_slices"

    def __init__(
        self,
        *,
        dim: int,
        seed: int,
        memory_size: int = 1 << 20,
        slice_size: int = 32,
        std: float | None = None,
        signed: bool = True,
    ) -> None:
        super().__init__(dim=dim, seed=seed)
        if isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1:
            raise ValueError(f"slice_size must be a positive int, got {slice_size!r}")
        if (
            isinstance(memory_size, bool)
            or not isinstance(memory_size, int)
            or memory_size < slice_size
        ):
            raise ValueError(
                f"memory_size must be an int >= slice_size ({slice_size}), got {memory_size!r}"
            )
        if std is None:
            std = 1.0 / math.sqrt(dim)
        if isinstance(std, bool) or not isinstance(std, int | float) or not 0 < std < math.inf:
            raise ValueError(f"std must be a positive finite float, got {std!r}")
        if not isinstance(signed, bool):
            raise ValueError(f"signed must be a bool, got {signed!r}")
        self.memory_size = memory_size
        self.slice_size = slice_size
        self.std = float(std)
        self.signed = signed
        self._s = min(slice_size, dim)  # S
        self._k = -(-dim // self._s)  # slices per row
        self._span = memory_size - self._s + 1  # valid offsets
        self._offset_seed = derive_seed(seed, _STREAM_OFFSETS)
        self.memory = nn.Parameter(
            hashed_normal_init((memory_size,), derive_seed(seed, _STREAM_INIT), self.std)
        )

    def config(self) -> dict[str, Any]:
        return {
            "memory_size": self.memory_size,
            "slice_size": self.slice_size,
            "std": self.std,
            "signed": self.signed,
        }

    def _slices(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Offsets ``[n * k]`` into ``memory`` and signs ``[n * k, 1]`` (None: unsigned)."""
        bits = stream_bits(ids.reshape(-1), self._offset_seed, self._k)  # (n, k)
        bits = bits.view(-1)  # (n * k)
        sign = torch.where(bits < 0, -1.0, 1.0).unsqueeze_(-1) if self.signed else None
        return bits.bitwise_and_(_INT64_MAX).remainder_(self._span), sign

    def generate_into(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        if self._k * self._s != self.dim or not out.is_contiguous():
            super().generate_into(ids, out)  # rows are cut from a longer slice run
            return
        # to the memory's device only: stream_bits checks and converts the dtype (the check
        # _prepare_ids would make first, a second time on every fill)
        offsets, sign = self._slices(ids.to(self.memory.device))
        memory = self.memory.detach()
        windows = memory.as_strided((memory.numel() - self._s + 1, self._s), (1, 1))
        flat = out.view(-1, self._s)  # (n * k, S): the same bytes as out
        torch.index_select(windows, 0, offsets, out=flat)
        if sign is not None:
            flat.mul_(sign)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self._prepare_ids(ids)
        offsets, sign = self._slices(ids)  # (n * k), (n * k, 1)
        rows = _GatherSlices.apply(self.memory, offsets, self._s)  # (n * k, S)
        if sign is not None:
            rows = rows.mul_(sign)
        rows = rows.view(-1, self._k * self._s)  # (n, k * S)
        if rows.shape[1] != self.dim:
            rows = rows[:, : self.dim].contiguous()
        return rows.view(*ids.shape, self.dim)
