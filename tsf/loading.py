"""Lazy weight loading shared by models, rewards and value functions (no tsf imports but errors)."""

import torch
from torch import nn

from tsf.errors import ConfigError

#: the weight precisions a config can name (``dtype: float16``)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config's ``dtype`` name; an unknown name is a ConfigError."""
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


class LazyLoadModule(nn.Module):
    """A module whose weights load on first use (:meth:`load`, idempotent), never at construction,
    so that validating a config reads no weight file. Subclasses override :meth:`_load`."""

    def __init__(self) -> None:
        super().__init__()
        self._loaded = False

    def load(self):
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    def _load(self) -> None:
        pass
