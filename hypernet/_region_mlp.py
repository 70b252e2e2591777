"""Region-conditioned MLP: a row's base from its hashed features and a learned region style.

Why: with a plain generator a row nobody trained reads random values, so in a big pool most of
what a token selects is noise until training reaches it (400 steps give a 10**7-row pool 1.3 uses
a row). DESIGN's answer is a hypernetwork conditioned on the row's region: rows of one region
(a routing cluster) share a learned embedding, so a step that trains one row of a region also
moves the base of every row there, and an untrained row already carries its region's style.
DHE (Kang et al., KDD 2021) shows the hash -> MLP half of this; the region embedding is the
"hypernetwork per cluster" of the seeds, in its cheapest form (a per-region input to one MLP
shared by all rows).

Regions are a pure function of the id (no router call), so a row can still be regenerated alone:

- ``region_map="product_keys"``: the product-key grid of ``dpsn.index.ProductKeyRouter`` over
  ``rows`` (``n2 = ceil(sqrt(rows))``, row ``i = i1 * n2 + i2``). Two tables, one per sub-key
  set: the row's region embedding is ``emb_a[i1] + emb_b[i2]``. Rows that share a first-half
  sub-key are the ones that half of a query selects together, so the tables follow the router's
  own clusters; storage is ``2 * sqrt(rows)`` embeddings.
- ``region_map="block"``: ``num_regions`` contiguous blocks of ids, sizes differing by at most one
  (region r owns ``[r * q + min(r, rem), ...)``, ``rows = q * R + rem``): exactly the regions of
  ``dpsn.index.VQRouter`` / ``LSHRouter`` with ``num_regions`` regions over ``rows`` (a test
  holds the two together). One table of ``num_regions`` embeddings.

Novelty: every region also has a novelty value (``novelty.<t>``, one float per region, 1 at
creation with ``novelty_source="usage"``, 0 with ``"manual"``), fed to the MLP as one more
input. It is a signal, not a trained weight: it stays frozen under ``requires_grad_(True)``, is
set from the rows' training uses (below) or by :meth:`RegionMLP.set_novelty`, and is persisted
with the weights.
Setting it is a change of the generator's weights like any other (cached bases are refreshed,
and the next commit writes a new generator version).

Automatic novelty (``novelty_source="usage"``, the default of new generators): the pool's tier
stack tells the generator which rows every row step trained and how often
(:meth:`RegionMLP.observe_uses`, one ``index_add_`` a table into per-region counts held aside),
and folds them in with :meth:`RegionMLP.refresh_from_uses` before every commit. Folding adds the
counts to ``uses.<t>`` (one float32 per region, persisted with the weights, frozen like novelty)
and sets ``novelty = 1 / (1 + log1p(uses))`` (:func:`novelty_from_counts`; 1 for a region never
trained, which is also every region's value at creation). Why at commits only: a frozen
generator's bases are cached, and moving them at every step would re-make every cached row at
every step; a trained generator's are made on every read, but folding at every step drifted its
MLP's input under it (docs/generators.md: 0.9-1.5% worse validation bits/byte at 10**6). At a
commit they move once, and the commit stores the values that made them, so a reopened store
reads its rows bit for bit. Uses noted after the last commit are not persisted (like uncommitted
deltas); a store reopened at that commit continues exactly as the writer would have.
``novelty_source="manual"`` (what a manifest without the option means: generators written
before it existed) keeps novelty where :meth:`RegionMLP.set_novelty` or
:meth:`RegionMLP.set_novelty_from_usage` (a router's ``usage_counter.counts()``, summed per
region) put it; in ``"usage"`` mode those still work, until the next refresh.

Per-region low-rank factors (``region_rank=r > 0``, opt-in): "a hypernetwork per cluster" in
full, not only a per-region input. Every region of every table also owns a low-rank change of
the output layer, ``B_t[r_t] @ A_t[r_t]`` (``A [rank, H_L]``, ``B [D, rank]``), so each region's
rows come from their own output layer ``W_L + sum_t B_t[r_t] A_t[r_t]``. ``B`` starts at zero
(a fresh generator with factors gives the same rows as one without), ``A`` from the seed; both
are stored at unit scale with fixed gains like the other weights (``a = 1 / sqrt(H_L)``,
``b = std / sqrt(rank)``). Cost: ``2 * rank * (D + H_L)`` floats a region, and a gather of
``rank * (D + H_L)`` floats per generated row.

Row formula (part of a store's meaning: never change it, add a new kind instead)::

    f       = hashed_uniform(id, derive_seed(seed, 0), features)                    (F)
    r_t     = region index of id in table t (above)
    e       = sum_t emb_t[r_t]                                                      (E)
    nu      = mean_t novelty_t[r_t]                                                 (1)
    h_0     = concat(f, e, nu)
    h_{l+1} = act(h_l @ W_l.T + b_l)           l = 0 .. layers-1
    row     = h_L @ W_L.T + b_L
              + sum_t B_t[r_t] @ (A_t[r_t] @ h_L)                        (region_rank > 0)

Weights are stored at unit scale and multiplied by a fixed per-layer gain in the forward pass
(the "equalized learning rate" of Karras et al., ICLR 2018): ``W_l = g_l * V_l`` with ``V_l``
uniform of variance 1 and ``g_l**2`` the variance :class:`RandomFeatureMLP` gives its weights
(``gain**2 / fan_in`` over inputs of second moment 1/3, ``std**2 / fan_in`` at the output), and
the output bias is ``std * c_L``. Why: the generator trains with the dense model's optimizer,
and Adam moves every parameter by about its learning rate whatever its scale; on weights of
scale 0.01 a step of 3e-3 rewrites a fifth of every base row, on unit-scale ones it is a small
relative step, the same for every layer and for the region embeddings (hashed normals of
standard deviation ``1/sqrt(3)``, the features' second moment). Rows start at a standard
deviation close to ``std``.

Row formula, exactly (``V_l``, ``c_l`` the stored ``weights.<l>``, ``biases.<l>``)::

    h_{l+1} = act(h_l @ (g_l * V_l).T + c_l)    l < L
    row     = h_L @ (g_L * V_L).T + std * c_L
              + sum_t (b * B_t[r_t]) @ ((a * A_t[r_t]) @ h_L)            (region_rank > 0)
"""

from __future__ import annotations

import itertools
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ._features import hashed_uniform
from ._generator import Generator
from ._hash import derive_seed
from ._init import hashed_normal_init, hashed_uniform_init
from ._rf_mlp import _ACTIVATIONS, _choice, _positive_int

__all__ = [
    "MAX_REGIONS",
    "NOVELTY_SOURCES",
    "REGION_MAPS",
    "RegionMLP",
    "novelty_from_counts",
    "region_mlp_spec",
    "region_tables",
]

# Hash streams of this kind (derive_seed(seed, stream)): persisted in effect, never renumber.
_STREAM_FEATURES = 0
_STREAM_INIT = 1  # weight l uses derive_seed(derive_seed(seed, 1), l)
_STREAM_EMBED = 2  # table t uses derive_seed(derive_seed(seed, 2), t)
_STREAM_LOWRANK = 3  # table t's A factors use derive_seed(derive_seed(seed, 3), t)

REGION_MAPS = ("product_keys", "block")
NOVELTY_SOURCES = ("usage", "manual")
MAX_REGIONS = 1 << 26  # entries of one region table: 2**26 x 16 floats is 4 GiB


def _grid_n2(rows: int) -> int:
    """``ceil(sqrt(rows))``: ``dpsn.index.grid_shape``'s second axis (a test holds them)."""
    r = math.isqrt(rows)
    return r if r * r == rows else r + 1


def region_tables(rows: int, region_map: str, num_regions: int | None) -> list[int]:
    """Entries of each region table for a pool of ``rows`` (``ValueError`` if out of range)."""
    if region_map == "product_keys":
        n2 = _grid_n2(rows)
        sizes = [-(-rows // n2), n2]
    elif region_map == "block":
        if num_regions is None:
            raise ValueError("region_map='block' needs num_regions (the router's regions)")
        sizes = [_positive_int("num_regions", num_regions)]
        if sizes[0] > rows:
            raise ValueError(f"num_regions={num_regions} exceeds rows={rows}")
    else:
        raise ValueError(f"region_map must be one of {list(REGION_MAPS)}, got {region_map!r}")
    if max(sizes) > MAX_REGIONS:
        raise ValueError(
            f"a region table of {max(sizes)} entries (rows={rows}, {region_map}) exceeds "
            f"{MAX_REGIONS}; use region_map='block' with fewer regions"
        )
    return sizes


def novelty_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Novelty in (0, 1] from per-region use counts: ``1 / (1 + log1p(count))``: 1 for a region
    never used, falling slowly with use (a region seen 10**4 times reads ~0.1)."""
    return 1.0 / (1.0 + torch.log1p(counts.detach().float().clamp_min(0)))


def region_mlp_spec(router: Any, **options: Any) -> dict[str, Any]:
    """The ``generator=`` spec of a ``region_mlp`` whose regions are ``router``'s: the block map
    of a region router (anything with ``num_regions``: ``VQRouter``, ``LSHRouter``), else the
    product-key grid. Read from the router's attributes (this package does not import
    ``dpsn.index``); ``options`` are the generator's other settings."""
    spec: dict[str, Any] = {"kind": RegionMLP.kind, "rows": int(router.num_rows), **options}
    if getattr(router, "num_regions", None) is not None:
        spec.update(region_map="block", num_regions=int(router.num_regions))
    else:
        spec["region_map"] = "product_keys"
    return spec


class RegionMLP(Generator):
    """Rows from an MLP over hashed features plus a learned embedding of the row's region and
    the region's novelty (see the module docstring for the regions and the formula).

    Axes: ``n`` ids, ``F`` features, ``E`` = ``region_dim``, ``H`` hidden, ``D`` = ``dim``.

    Args:
        dim: row width.
        seed: fixes the features and the initial weights and embeddings.
        rows: the pool's rows (``dpsn.create`` fills it in); fixes the region of every id.
        region_map: ``"product_keys"`` (default; a ``ProductKeyRouter``'s sub-key grid) or
            ``"block"`` (a ``VQRouter``/``LSHRouter``'s ``num_regions`` contiguous regions).
        num_regions: regions of the ``"block"`` map (ignored by ``"product_keys"``).
        region_dim: width of a region embedding.
        features, hidden, layers, activation, std: as :class:`RandomFeatureMLP`.
        region_rank: rank of each region's own change of the output layer (0, the default:
            none; see the module docstring).
        novelty_source: ``"usage"`` (default: novelty follows the rows' training uses, kept by
            the pool) or ``"manual"`` (set only by :meth:`set_novelty`); module docstring.
    """

    kind = "region_mlp"  # persisted in stores: never rename
    takes_rows = True  # dpsn.create passes the pool's rows
    # What a stored config without an option means (it was written before the option existed):
    # such generators had manual novelty, zero at creation, and no per-region use counts.
    manifest_defaults: ClassVar[dict[str, Any]] = {"novelty_source": "manual"}

    def __init__(
        self,
        *,
        dim: int,
        seed: int,
        rows: int,
        region_map: str = "product_keys",
        num_regions: int | None = None,
        region_dim: int = 16,
        features: int = 64,
        hidden: int = 128,
        layers: int = 2,
        activation: str = "mish",
        std: float | None = None,
        region_rank: int = 0,
        novelty_source: str = "usage",
    ) -> None:
        super().__init__(dim=dim, seed=seed)
        self.novelty_source = _choice(
            "novelty_source", novelty_source, dict.fromkeys(NOVELTY_SOURCES)
        )
        auto = novelty_source == "usage"
        self.region_rank = _positive_int("region_rank", region_rank, minimum=0)
        self.rows = _positive_int("rows", rows)
        self.region_map = _choice("region_map", region_map, dict.fromkeys(REGION_MAPS))
        self.num_regions = None if region_map == "product_keys" else num_regions
        sizes = region_tables(self.rows, region_map, self.num_regions)
        self.region_dim = _positive_int("region_dim", region_dim)
        self.features = _positive_int("features", features)
        self.hidden = _positive_int("hidden", hidden)
        self.layers = _positive_int("layers", layers, minimum=0)
        self.activation = _choice("activation", activation, _ACTIVATIONS)
        if std is None:
            std = 1.0 / math.sqrt(dim)
        if isinstance(std, bool) or not isinstance(std, int | float) or not 0 < std < math.inf:
            raise ValueError(f"std must be a positive finite float, got {std!r}")
        self.std = float(std)
        self._feature_seed = derive_seed(seed, _STREAM_FEATURES)
        self._act = _ACTIVATIONS[activation]
        self._n2 = _grid_n2(self.rows)
        if self.num_regions is not None:
            self._block, self._rem = divmod(self.rows, self.num_regions)

        embed_seed = derive_seed(seed, _STREAM_EMBED)
        self.embeddings = nn.ParameterList()
        self.novelty = nn.ParameterList()
        self.uses = nn.ParameterList()  # "usage" mode: uses folded in per region (float32)
        for t, size in enumerate(sizes):
            e = hashed_normal_init((size, region_dim), derive_seed(embed_seed, t), 3.0**-0.5)
            self.embeddings.append(nn.Parameter(e))
            start = torch.ones(size) if auto else torch.zeros(size)  # ones: never trained
            self.novelty.append(nn.Parameter(start, requires_grad=False))
            if auto:
                self.uses.append(nn.Parameter(torch.zeros(size), requires_grad=False))
        # uses noted since the last refresh, per table (float64, made at the first use); not
        # a parameter: noting a use changes no row and must not look like a weight change
        self._pending: list[torch.Tensor] | None = None

        widths = [features + region_dim + 1] + [hidden] * layers + [dim]
        hidden_gain2 = 1.0 if activation == "tanh" else 2.0
        init_seed = derive_seed(seed, _STREAM_INIT)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self._gains: list[float] = []  # g_l: weights are stored at unit variance
        for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            variance = (self.std**2 if layer == layers else hidden_gain2) / fan_in
            if layer == 0:
                variance *= 3.0  # inputs of second moment 1/3 (features and embeddings)
            self._gains.append(math.sqrt(variance))
            unit = math.sqrt(3.0)  # uniform on [-sqrt 3, sqrt 3) has variance 1
            w = hashed_uniform_init((fan_out, fan_in), derive_seed(init_seed, layer), unit)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(fan_out, dtype=torch.float32)))

        # per-region low-rank output factors (a hypernetwork per cluster), opt-in
        self.factors_a = nn.ParameterList()  # table t: [regions, rank, H_L]
        self.factors_b = nn.ParameterList()  # table t: [regions, D, rank], zero at creation
        h_last = widths[-2]
        self._gain_a = 1.0 / math.sqrt(h_last)
        self._gain_b = self.std / math.sqrt(max(self.region_rank, 1))
        if self.region_rank:
            low_seed = derive_seed(seed, _STREAM_LOWRANK)
            for t, size in enumerate(sizes):
                a = hashed_uniform_init(
                    (size, self.region_rank, h_last), derive_seed(low_seed, t), math.sqrt(3.0)
                )
                self.factors_a.append(nn.Parameter(a))
                self.factors_b.append(nn.Parameter(torch.zeros(size, dim, self.region_rank)))

    def config(self) -> dict[str, Any]:
        # region_rank only when set: stores written before it existed keep their manifests
        extra = {"region_rank": self.region_rank} if self.region_rank else {}
        return {
            **extra,
            "novelty_source": self.novelty_source,
            "rows": self.rows,
            "region_map": self.region_map,
            "num_regions": self.num_regions,
            "region_dim": self.region_dim,
            "features": self.features,
            "hidden": self.hidden,
            "layers": self.layers,
            "activation": self.activation,
            "std": self.std,
        }

    def requires_grad_(self, requires_grad: bool = True) -> RegionMLP:
        """As ``nn.Module.requires_grad_``, but novelty and use counts stay frozen: they are
        signals (set from uses or by :meth:`set_novelty`), not weights the optimizer steps."""
        super().requires_grad_(requires_grad)
        for p in itertools.chain(self.novelty, self.uses):
            p.requires_grad_(False)
        return self

    # -- regions -------------------------------------------------------------------------------

    def regions(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Region index of every id in each table (int64, ``ids``' shape), without a router.

        ``"product_keys"``: ``[i // n2, i % n2]`` (the two sub-keys); ``"block"``: ``[r]``, as
        ``RegionRouter.region_of``. Ids outside ``[0, rows)`` are the caller's error (the pool
        checks ranges); here they are clamped into the tables.
        """
        ids = self._prepare_ids(ids)
        if self.num_regions is None:
            return [
                torch.div(ids, self._n2, rounding_mode="floor").clamp_(
                    0, self.embeddings[0].shape[0] - 1
                ),
                ids.remainder(self._n2),
            ]
        edge = self._rem * (self._block + 1)
        big = torch.div(ids, self._block + 1, rounding_mode="floor")
        small = self._rem + torch.div(ids - edge, self._block, rounding_mode="floor")
        return [torch.where(ids < edge, big, small).clamp_(0, self.num_regions - 1)]

    @torch.no_grad()
    def set_novelty(self, table: int, values: torch.Tensor) -> None:
        """Set the novelty of every region of ``table`` (``values [len(table)]``, finite).

        A router supplies it from its usage: with ``region_map="block"``, per-region use counts
        of a ``VQRouter``/``LSHRouter``; with ``"product_keys"``, counts of each sub-key
        (table 0: ``id // n2``, table 1: ``id % n2``), e.g. through :func:`novelty_from_counts`.
        """
        if isinstance(table, bool) or not isinstance(table, int):
            raise TypeError(f"table must be an int, got {type(table).__name__}")
        if not 0 <= table < len(self.novelty):
            raise ValueError(f"table must be in [0, {len(self.novelty)}), got {table}")
        target = self.novelty[table]
        values = torch.as_tensor(values, dtype=torch.float32)
        if values.shape != target.shape:
            raise ValueError(f"novelty of table {table} takes {tuple(target.shape)} values")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("novelty values must be finite")
        target.copy_(values.to(target.device))

    @torch.no_grad()
    def set_novelty_from_usage(self, ids: torch.Tensor, counts: torch.Tensor) -> None:
        """Set every table's novelty from row usage: ``ids [M]`` rows and ``counts [M]`` their
        uses (a router's ``usage_counter.counts()``), summed per region, through
        :func:`novelty_from_counts` (regions never used read 1). Vectorized: one ``index_add_``
        a table."""
        ids = torch.as_tensor(ids).reshape(-1)
        counts = torch.as_tensor(counts).reshape(-1)
        if ids.shape != counts.shape:
            raise ValueError(f"ids {tuple(ids.shape)} and counts {tuple(counts.shape)} differ")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.rows):
            raise ValueError(f"usage ids must be rows in [0, {self.rows})")
        regions = self.regions(ids)
        for t, r in enumerate(regions):
            per = torch.zeros(self.novelty[t].shape[0], dtype=torch.float64, device=r.device)
            per.index_add_(0, r, counts.to(device=r.device, dtype=torch.float64))
            self.set_novelty(t, novelty_from_counts(per))

    @torch.no_grad()
    def observe_uses(self, ids: torch.Tensor, counts: torch.Tensor) -> None:
        """Add ``counts [M]`` uses of rows ``ids [M]`` to their regions' pending counts (one
        ``index_add_`` a table; no row changes until :meth:`refresh_from_uses`). The pool calls
        it at every row step; ``"manual"`` novelty ignores it."""
        if self.novelty_source != "usage":
            return
        ids = self._prepare_ids(ids).reshape(-1)
        if ids.numel() == 0:
            return
        weights = torch.as_tensor(counts).reshape(-1).to(ids.device, torch.float64)
        if self._pending is None or self._pending[0].device != ids.device:
            self._pending = [
                torch.zeros(len(n), dtype=torch.float64, device=ids.device) for n in self.novelty
            ]
        for pending, r in zip(self._pending, self.regions(ids), strict=True):
            pending.index_add_(0, r, weights)

    @torch.no_grad()
    def refresh_from_uses(self) -> bool:
        """Fold the pending uses into ``uses.<t>`` and set ``novelty = novelty_from_counts(
        uses)`` in every table; False (nothing moves) when no use is pending."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        for t, add in enumerate(pending):
            total = self.uses[t].double() + add.to(self.uses[t].device)
            self.uses[t].copy_(total.float())
            self.novelty[t].copy_(novelty_from_counts(self.uses[t]))
        return True

    # -- rows ----------------------------------------------------------------------------------

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self._prepare_ids(ids)
        flat = ids.reshape(-1)
        f = hashed_uniform(flat, self._feature_seed, self.features)  # (n, F)
        regions = self.regions(flat)
        e = F.embedding(regions[0], self.embeddings[0])  # (n, E)
        nu = self.novelty[0].index_select(0, regions[0])  # (n,)
        for t in range(1, len(regions)):
            e = e + F.embedding(regions[t], self.embeddings[t])
            nu = nu + self.novelty[t].index_select(0, regions[t])
        if len(regions) > 1:
            nu = nu / len(regions)
        h = torch.cat([f.to(e.dtype), e, nu[:, None].to(e.dtype)], dim=1)  # (n, F + E + 1)
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if layer != last:
                h = self._act(F.linear(h, w * self._gains[layer], b))  # (n, H)
                continue
            out = F.linear(h, w * self._gains[layer], b * self.std)  # (n, D)
            for t, r in enumerate(regions[: len(self.factors_a)]):  # region_rank > 0
                a = self.factors_a[t].index_select(0, r)  # (n, rank, H_L)
                z = torch.bmm(a, h[:, :, None]) * self._gain_a  # (n, rank, 1)
                b_t = self.factors_b[t].index_select(0, r)  # (n, D, rank)
                out = out + torch.bmm(b_t, z)[:, :, 0] * self._gain_b
            h = out
        return h.view(*ids.shape, self.dim)
