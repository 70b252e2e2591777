"""Where nearest-centroid searches run: faiss-cpu, faiss-gpu, or torch on CUDA tensors.

- CPU tensors: faiss-cpu (``IndexFlatL2``), the path that runs in CI.
- CUDA tensors with faiss-gpu installed (``faiss.get_num_gpus() > 0``): the same index copied to
  the GPU with ``index_cpu_to_gpu`` (one ``StandardGpuResources`` per process).
- CUDA tensors without faiss-gpu (the usual case: faiss-gpu wheels are CUDA 12 only and clash
  with faiss-cpu, see STORAGE-NOTES): ``torch`` matmul + topk on the device.

All give the same neighbours within FAISS's float tolerance (ties aside); the tests compare the
faiss and torch paths on CPU. ``backend="torch"`` forces the torch path anywhere.
"""

from __future__ import annotations

from typing import Literal

import faiss
import numpy as np
import torch
from torch import Tensor

__all__ = ["BACKENDS", "Backend", "FlatL2Index", "faiss_gpu_available", "index_to_bytes"]

Backend = Literal["auto", "faiss", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "faiss", "torch")

_GPU_RESOURCES: object | None = None


def faiss_gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def index_to_bytes(index: faiss.Index) -> np.ndarray:
    """``faiss.serialize_index`` as a uint8 array (what the persisted store holds).

    Stored blobs are never deserialised: a router rebuilds its index from its digest-checked
    buffers and compares the bytes (see ``load_extra_arrays``), so a crafted blob cannot reach
    faiss's C++ parser.
    """
    return np.asarray(faiss.serialize_index(index), dtype=np.uint8)


def _use_torch(q: Tensor, backend: str) -> bool:
    if backend == "torch":
        return True
    if backend == "faiss":
        return False
    return q.is_cuda and not faiss_gpu_available()


class FlatL2Index:
    """An exact L2 index over a small codebook ``[c, d]``, searched on the tensor's device.

    The torch path needs the codebook as a tensor on the query's device (``codebook``); the
    router passes its buffer, which always equals what the FAISS index holds (both are set
    together by ``fit``/``refresh``).
    """

    def __init__(self, index: faiss.IndexFlatL2) -> None:
        self.index = index
        self._gpu_index: faiss.Index | None = None

    @classmethod
    def build(cls, codebook: np.ndarray) -> FlatL2Index:
        cb = np.ascontiguousarray(codebook, dtype=np.float32)
        index = faiss.IndexFlatL2(cb.shape[1])
        index.add(cb)
        return cls(index)

    def to_bytes(self) -> np.ndarray:
        return index_to_bytes(self.index)

    def vectors(self) -> np.ndarray:
        """The codebook the index holds, ``[c, d]``."""
        return self.index.reconstruct_n(0, self.index.ntotal)

    def search(
        self, q: Tensor, k: int, *, codebook: Tensor, backend: str = "auto"
    ) -> tuple[Tensor, Tensor]:
        """``(squared distances, ids)``, each ``[M, k]`` ascending, on ``q``'s device."""
        if _use_torch(q, backend):
            cb = codebook.to(q.dtype)
            d = (q * q).sum(-1, keepdim=True) - 2 * q @ cb.T + (cb * cb).sum(-1)  # [M, c]
            dist, idx = d.topk(k, dim=-1, largest=False)
            return dist.clamp_min_(0.0), idx
        index = self.index
        if q.is_cuda and faiss_gpu_available():  # pragma: no cover - needs faiss-gpu
            if self._gpu_index is None:
                global _GPU_RESOURCES
                if _GPU_RESOURCES is None:
                    _GPU_RESOURCES = faiss.StandardGpuResources()
                self._gpu_index = faiss.index_cpu_to_gpu(_GPU_RESOURCES, q.device.index or 0, index)
            index = self._gpu_index
        qn = np.ascontiguousarray(q.detach().float().cpu().numpy())
        dist, idx = index.search(qn, k)
        return (
            torch.from_numpy(dist).to(device=q.device, dtype=q.dtype),
            torch.from_numpy(idx).to(q.device),
        )
