"""The procedural tier: base rows from the store's generator, and whether its weights moved.

The generator is rebuilt from the store (kind and config from the manifest, weights from the
commit's generator version, checked) and frozen. Its base rows are cached beside trained deltas,
so the tier stack must know when they go stale: every parameter's ``_version`` counter moves on
an in-place change (an optimizer step, ``load_state_dict``), and a parameter that requires grad
means bases must be regenerated on every read.
"""

from __future__ import annotations

import numpy as np
import torch

from dpsn.errors import CorruptStoreError
from dpsn.hypernet import GENERATORS, Generator, make_generator
from dpsn.store import PersistedStore


def load_generator(store: PersistedStore, version: int, device: torch.device) -> Generator:
    """The generator of ``store`` at weights ``version``, frozen, in eval mode, on ``device``."""
    m = store.manifest
    kind, config = m.generator["kind"], m.generator["config"]
    # options a manifest written before they existed lacks keep their old meaning
    defaults = getattr(GENERATORS.get(kind), "manifest_defaults", {})
    config = {**defaults, **config}
    # Built on the meta device: its initialisation would be thrown away by the stored weights.
    # A generator with (non-persisted, derived) buffers needs them computed: build it for real.
    with torch.device("meta"):
        gen = make_generator(kind, dim=m.dim, seed=m.seed, **config)
    if any(True for _ in gen.buffers()):
        gen = make_generator(kind, dim=m.dim, seed=m.seed, **config)
    state = store.read_generator(version)
    expected = set(gen.state_dict())
    if set(state) != expected:
        raise CorruptStoreError(
            f"generator weights in the store ({sorted(state)}) do not match the "
            f"{kind} generator ({sorted(expected)})"
        )
    gen.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, assign=True)
    gen.requires_grad_(False)
    return gen.to(device).eval()


def _observes_uses(generator: Generator) -> bool:
    """Whether the generator's rows depend on use (it overrides ``observe_uses``): asked once,
    so a row step of any other generator does not call into it."""
    return type(generator).observe_uses is not Generator.observe_uses


class ProceduralTier:
    """Makes base rows and tracks the generator's weights against what the cache and the last
    commit hold."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self._params = list(generator.parameters())
        self.observes_uses = _observes_uses(generator)
        self.rows_generated = 0
        self.seen = self.stamp()  # the weights cached rows were made from
        self.saved = self.seen  # the weights as last committed

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Base rows ``[n, dim]`` float32 on the generator's device for 1-D ``ids``."""
        self.rows_generated += len(ids)
        return self.generator(ids)

    def generate_into(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        """Base rows of 1-D ``ids`` written into ``out`` (float32, contiguous) without an
        intermediate tensor where the generator can (a cache fill straight into its memory)."""
        self.rows_generated += len(ids)
        self.generator.generate_into(ids, out)

    def observe_uses(self, ids: torch.Tensor, counts: torch.Tensor) -> None:
        """A row step trained distinct ``ids`` ``counts`` times: tell the generator (rows that
        depend on use, ``region_mlp``'s novelty). No row moves here; the commit folds the uses
        in (:meth:`refresh_from_uses`), trained generator or frozen: folding them at every step
        of a trained one cost 0.9-1.5% validation bits/byte in docs/generators.md's LM at 10^6 rows
        (its MLP input drifts under it), and a frozen one's cached bases would be re-made at
        every step."""
        self.generator.observe_uses(ids, counts)

    def refresh_from_uses(self) -> None:
        """Fold the uses noted since the last refresh into the generator (before a commit)."""
        self.generator.refresh_from_uses()

    def stamp(self) -> tuple[int, ...]:
        """Identity and version of every weight: it changes with any in-place update (an
        optimizer step, ``load_state_dict``). The weights are listed once (walking the module
        on every read cost ~20 us); replacing a weight object by assignment is seen only if it
        is a direct parameter of the generator module."""
        direct = self.generator._parameters.values()
        if any(p is not q for p, q in zip(direct, self._params, strict=False)):
            self._params = list(self.generator.parameters())
        return tuple(v for p in self._params for v in (id(p), p._version))

    def trainable(self) -> bool:
        """True while some weight requires grad: bases must then be regenerated on every read
        (through autograd) rather than taken from the cache."""
        return any(p.requires_grad for p in self._params)

    def changed_since_commit(self) -> bool:
        return self.stamp() != self.saved

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The weights as float32 arrays, as a commit stores them."""
        return {k: v.detach().cpu().float().numpy() for k, v in self.generator.state_dict().items()}

    def replace(self, generator: Generator) -> None:
        """Adopt another version of the weights (a reader moving to a newer commit)."""
        self.generator = generator
        self._params = list(generator.parameters())
        self.observes_uses = _observes_uses(generator)
        self.seen = self.saved = self.stamp()
