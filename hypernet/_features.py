"""Deterministic per-row features drawn from hashes, with no RNG state.

Why counter-based: a row's features must be a pure function of ``(seed, id)`` so that any row
can be regenerated alone, in any batch, on any device, without replaying a random stream. Each
id is hashed once with XXH64 and then expanded into ``n`` independent 64-bit words by the
splitmix64 finaliser applied to a Weyl sequence (the construction of Steele, Lea & Flood,
"Fast splittable pseudorandom number generators", OOPSLA 2014)::

    bits[..., j] = mix64(xxh64(id, seed) + (j + 1) * 0x9E3779B97F4A7C15)      j = 0 .. n-1

Every feature below is a fixed function of these words, so the formulas are part of what a
store's rows mean: never change them (add a new function instead). Use :func:`derive_seed` to
get unrelated streams for unrelated purposes from one user seed.

Ranges are chosen so float32 represents every value exactly where possible: a uniform feature
is a 24-bit integer times ``2**-23``, which makes ``hashed_uniform`` bit-identical on every
device. ``hashed_normal`` goes through ``log``/``cos``/``sin`` and so matches across devices
only within float tolerance (bit-identical on one device).
"""

from __future__ import annotations

import math

import torch

from ._hash import _CPU_CHUNK, _signed, as_int64_ids, xxh64_ids

__all__ = ["hashed_normal", "hashed_offsets", "hashed_uniform", "stream_bits"]

_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
_INT64_MAX = (1 << 63) - 1


def _check_count(n: int, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    return n


def _mix64_into(z: torch.Tensor, t: torch.Tensor) -> None:
    """splitmix64's finaliser, in place on the 1-D int64 ``z``; ``t`` is scratch of its size."""
    torch.bitwise_right_shift(z, 30, out=t)
    z.bitwise_xor_(t.bitwise_and_((1 << 34) - 1)).mul_(_M1)
    torch.bitwise_right_shift(z, 27, out=t)
    z.bitwise_xor_(t.bitwise_and_((1 << 37) - 1)).mul_(_M2)
    torch.bitwise_right_shift(z, 31, out=t)
    z.bitwise_xor_(t.bitwise_and_((1 << 33) - 1))


def stream_bits(ids: torch.Tensor, seed: int, n: int) -> torch.Tensor:
    """``n`` independent 64-bit words per id, as int64 ``[..., n]`` (the formula is above)."""
    ids = as_int64_ids(ids)
    _check_count(n)
    h = xxh64_ids(ids, seed)  # (...)
    steps = torch.arange(1, n + 1, dtype=torch.int64, device=ids.device).mul_(_GOLDEN)
    z = h.unsqueeze(-1) + steps  # (..., n), wraps mod 2**64
    flat = z.view(-1)
    total = flat.numel()
    if flat.device.type == "cpu" and total > _CPU_CHUNK:
        t = torch.empty(_CPU_CHUNK, dtype=torch.int64)
        for start in range(0, total, _CPU_CHUNK):
            stop = min(start + _CPU_CHUNK, total)
            _mix64_into(flat[start:stop], t[: stop - start])
    else:
        _mix64_into(flat, torch.empty_like(flat))
    return z


def hashed_uniform(ids: torch.Tensor, seed: int, n: int) -> torch.Tensor:
    """``n`` uniform features per id: float32 ``[..., n]`` in ``[-1, 1)``, steps of ``2**-23``.

    The top 24 bits of each word, read as a signed integer, scaled exactly: bit-identical on
    every device.
    """
    bits = stream_bits(ids, seed, n)
    return bits.bitwise_right_shift_(40).to(torch.float32).mul_(2.0**-23)


def hashed_normal(ids: torch.Tensor, seed: int, n: int) -> torch.Tensor:
    """``n`` standard normal features per id: float32 ``[..., n]``, Box-Muller on 24-bit halves.

    Word ``k`` yields features ``2k`` and ``2k+1``: ``u1 = (top 24 bits + 1) * 2**-24`` in
    ``(0, 1]`` and ``u2 = (low 24 bits) * 2**-24`` in ``[0, 1)``, then
    ``sqrt(-2 ln u1) * (cos, sin)(2 pi u2)``. ``|value| <= sqrt(48 ln 2) ~ 5.77``.
    """
    _check_count(n)
    bits = stream_bits(ids, seed, (n + 1) // 2)  # (..., m)
    u2 = (bits & ((1 << 24) - 1)).to(torch.float32).mul_(2.0**-24)
    u1 = bits.bitwise_right_shift_(40).bitwise_and_((1 << 24) - 1).add_(1)
    r = u1.to(torch.float32).mul_(2.0**-24).log_().mul_(-2.0).sqrt_()
    theta = u2.mul_(2.0 * math.pi)
    z = torch.stack((r * torch.cos(theta), r * torch.sin(theta)), dim=-1)  # (..., m, 2)
    z = z.view(*z.shape[:-2], 2 * z.shape[-2])  # (..., 2m)
    return z if z.shape[-1] == n else z[..., :n].contiguous()


def hashed_offsets(ids: torch.Tensor, seed: int, n: int, modulus: int) -> torch.Tensor:
    """``n`` offsets per id: int64 ``[..., n]`` in ``[0, modulus)``, ``1 <= modulus <= 2**63``.

    The word's low 63 bits modulo ``modulus`` (the sign bit is dropped first, so offsets are
    never negative). The bias of the modulo is below ``modulus / 2**63``.
    """
    if isinstance(modulus, bool) or not isinstance(modulus, int) or not 1 <= modulus <= 1 << 63:
        raise ValueError(f"modulus must be an int in [1, 2**63], got {modulus!r}")
    bits = stream_bits(ids, seed, n).bitwise_and_(_INT64_MAX)
    if modulus & (modulus - 1) == 0:
        # Same values as the remainder below, far cheaper.
        return bits.bitwise_and_(modulus - 1)
    return bits.remainder_(modulus)
