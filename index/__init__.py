"""Routers: which pool rows each input needs, and how many.

``router(x)`` with ``x [T, d_in]`` returns a :class:`RouteResult` (``ids``, ``scores``, ``k``;
padding is id -1 / score -inf past ``k[t]``, see ``_base``). Implementations:

- :class:`ProductKeyRouter`: exact, differentiable product keys (PKM / PEER), up to 2**62 rows.
- :class:`VQRouter`: hierarchical residual FAISS k-means regions + product keys inside.
- :class:`LSHRouter`: FAISS ``IndexLSH`` sign-code regions + product keys inside.

State persists to a Zarr v3 group with :func:`save_router` / :func:`load_router`.
"""

from ._backend import faiss_gpu_available
from ._base import PAD_ID, PAD_SCORE, Router, RouteResult
from ._budget import Budget
from ._config import LSHConfig, ProductKeyConfig, RegionConfig, RouterConfig, VQConfig
from ._errors import RouterConfigError, RouterInputError, RouterNotFittedError, UnknownRouterError
from ._lsh import LSHRouter
from ._persist import ROUTER_KINDS, load_router, router_digest, save_router
from ._product_keys import ProductKeyRouter
from ._regions import RegionRouter
from ._topk import merge_topk, topk_ip
from ._usage import usage_figures
from ._vq import VQRouter

__all__ = [
    "PAD_ID",
    "PAD_SCORE",
    "ROUTER_KINDS",
    "Budget",
    "LSHConfig",
    "LSHRouter",
    "ProductKeyConfig",
    "ProductKeyRouter",
    "RegionConfig",
    "RegionRouter",
    "RouteResult",
    "Router",
    "RouterConfig",
    "RouterConfigError",
    "RouterInputError",
    "RouterNotFittedError",
    "UnknownRouterError",
    "VQConfig",
    "VQRouter",
    "faiss_gpu_available",
    "load_router",
    "merge_topk",
    "router_digest",
    "save_router",
    "topk_ip",
    "usage_figures",
]
