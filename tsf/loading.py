"""Lazy weight loading shared by models, rewards and value functions (no other tsf imports here)."""

from torch import nn


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
