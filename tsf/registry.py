"""One registry per kind of thing (rewards, samplers): lookup by name with errors that list the names."""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from tsf.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str, factory: Callable[..., T] | None = None, **defaults: Any):
        """Register ``factory`` (a class or function) under ``name``, with default keyword arguments.

        Used as a decorator (``@REWARDS.register("brightness")``) or called directly.
        """

        def add(f: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = (lambda **kw: f(**{**defaults, **kw})) if defaults else f
            return f

        return add(factory) if factory is not None else add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"

    def check(self, name: str) -> None:
        if name not in self._entries:
            import difflib

            near = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{hint}; known {self.kind}s: {', '.join(self.names())}")

    def get(self, name: str) -> Callable[..., T]:
        self.check(name)
        return self._entries[name]

    def build(self, spec: Any, **kwargs: Any) -> T:
        """A registered name becomes an instance; an instance passes through unchanged."""
        if isinstance(spec, str):
            return self.get(spec)(**kwargs)
        return spec
