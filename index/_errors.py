"""Errors raised by the routers.

Each derives from :class:`dpsn.errors.DpsnError` and from the builtin a caller would already
catch, as the rest of dpsn does (see ``dpsn/errors.py``).
"""

from __future__ import annotations

from dpsn.errors import DpsnError

__all__ = [
    "RouterConfigError",
    "RouterInputError",
    "RouterNotFittedError",
    "UnknownRouterError",
]


class RouterInputError(DpsnError, ValueError):
    """The input to ``router(x)`` has the wrong shape, dtype, device, or holds NaN/Inf."""


class RouterConfigError(DpsnError, ValueError):
    """A router was built (or fitted) with hyperparameters that cannot work together."""


class RouterNotFittedError(DpsnError, RuntimeError):
    """A VQ/LSH router was asked to route before ``fit(x_sample)`` trained its regions."""


class UnknownRouterError(DpsnError, ValueError):
    """A stored router names a kind (or format version) this dpsn does not know."""
