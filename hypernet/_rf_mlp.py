"""Random-feature MLP: hashed features of the id through a small trainable MLP.

Why: Deep Hash Embeddings (Kang et al., KDD 2021) replace an embedding table by a fixed, dense
hash encoding of the id followed by an MLP, so every row is shaped by shared weights that all
training updates, instead of by a few hash-shared slots. Here the encoding is
``hashed_uniform`` or ``hashed_normal`` of the id (no stored table, no RNG state) and the MLP is
``features -> hidden (x layers, with activation) -> dim``. It costs a few small matmuls per row,
more than :class:`HashedSlices`' gather, and in return its parameters do not grow with the pool.

Row formula (part of a store's meaning: never change it, add a new kind instead)::

    h_0     = hashed_<distribution>(id, derive_seed(seed, 0), features)
    h_{l+1} = act(h_l @ W_l.T + b_l)           l = 0 .. layers-1
    row     = h_L @ W_L.T + b_L

Initial weights are uniform with variance ``gain**2 / fan_in`` for hidden layers (``gain**2 =
2`` for the ReLU-like activations, 1 for tanh) and ``std**2 / fan_in`` for the output layer, the
first layer also divided by its input's second moment (1/3 for uniform features); biases start
at zero. Rows then start with a standard deviation close to ``std`` (measured 0.9-1.1 x ``std``
for mish/gelu at 0-4 layers; silu and tanh shrink it with depth).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._features import hashed_normal, hashed_uniform
from ._generator import Generator
from ._hash import derive_seed
from ._init import hashed_uniform_init

__all__ = ["RandomFeatureMLP"]

# Hash streams of this kind (derive_seed(seed, stream)): persisted in effect, never renumber.
_STREAM_FEATURES = 0
_STREAM_INIT = 1  # weight l uses derive_seed(derive_seed(seed, 1), l)

_DISTRIBUTIONS: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    "uniform": hashed_uniform,
    "normal": hashed_normal,
}
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mish": F.mish,
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "tanh": torch.tanh,
}


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _choice(name: str, value: Any, options: dict[str, Any]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {value!r}")
    return value


class RandomFeatureMLP(Generator):
    """Rows from an MLP over fixed hashed features of the id (Deep Hash Embedding style).

    Axes: ``n`` ids, ``F`` features, ``H`` hidden width, ``D`` = ``dim``.

    Args:
        dim: row width.
        seed: fixes the features and the initial weights.
        features: hashed features per id (the MLP's input width).
        hidden: width of each hidden layer.
        layers: hidden layers (0 makes the generator a linear map of the features).
        distribution: ``"uniform"`` (in [-1, 1), bit-identical on every device) or
            ``"normal"``.
        activation: one of ``"mish"`` (DHE's choice), ``"silu"``, ``"gelu"``, ``"relu"``,
            ``"tanh"``.
        std: target scale of the initial rows (default ``1 / sqrt(dim)``).
    """

    kind = "rf_mlp"

    def __init__(
        self,
        *,
        dim: int,
        seed: int,
        features: int = 64,
        hidden: int = 128,
        layers: int = 2,
        distribution: str = "uniform",
        activation: str = "mish",
        std: float | None = None,
    ) -> None:
        super().__init__(dim=dim, seed=seed)
        self.features = _positive_int("features", features)
        self.hidden = _positive_int("hidden", hidden)
        self.layers = _positive_int("layers", layers, minimum=0)
        self.distribution = _choice("distribution", distribution, _DISTRIBUTIONS)
        self.activation = _choice("activation", activation, _ACTIVATIONS)
        if std is None:
            std = 1.0 / math.sqrt(dim)
        if isinstance(std, bool) or not isinstance(std, int | float) or not 0 < std < math.inf:
            raise ValueError(f"std must be a positive finite float, got {std!r}")
        self.std = float(std)
        self._feature_seed = derive_seed(seed, _STREAM_FEATURES)
        self._encode = _DISTRIBUTIONS[distribution]
        self._act = _ACTIVATIONS[activation]

        widths = [features] + [hidden] * layers + [dim]
        hidden_gain2 = 1.0 if activation == "tanh" else 2.0
        init_seed = derive_seed(seed, _STREAM_INIT)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        input_moment2 = 1.0 / 3.0 if distribution == "uniform" else 1.0  # E[h_0**2]
        for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            variance = (self.std**2 if layer == layers else hidden_gain2) / fan_in
            if layer == 0:
                variance /= input_moment2
            bound = math.sqrt(3.0 * variance)  # uniform on [-b, b) has variance b**2 / 3
            w = hashed_uniform_init((fan_out, fan_in), derive_seed(init_seed, layer), bound)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(fan_out, dtype=torch.float32)))

    def config(self) -> dict[str, Any]:
        return {
            "features": self.features,
            "hidden": self.hidden,
            "layers": self.layers,
            "distribution": self.distribution,
            "activation": self.activation,
            "std": self.std,
        }

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self._prepare_ids(ids)
        h = self._encode(ids.reshape(-1), self._feature_seed, self.features)  # (n, F)
        h = h.to(self.weights[0].dtype)
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = F.linear(h, w, b)  # (n, H) or (n, D) at the last layer
            if layer != last:
                h = self._act(h)
        return h.view(*ids.shape, self.dim)
