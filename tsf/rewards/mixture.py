"""A weighted sum of rewards: ``r(x) = sum_i w_i (r_i(x) - shift_i) / scale_i`` (registered as ``weighted_sum``).

Each term is a registered reward name, a reward class path (with its ``init_args``) or, from Python, a
:class:`~tsf.rewards.base.Reward` instance. The evaluator logs every term beside the sum
(``target/<term>/mean``; ``samples.pt`` keeps each term's value per sample under ``<sum>/<term>``).
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from tsf.errors import ConfigError
from tsf.rewards.base import REWARDS, Reward

#: the keys a term's mapping may hold
TERM_KEYS = ("weight", "shift", "scale", "class_path", "init_args", "reward")


def _import_reward(path: str, init_args: Optional[dict]) -> Reward:
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"weighted_sum: cannot import the reward class {path!r} ({type(e).__name__}: {e}); give a "
                          f"registered name ({', '.join(REWARDS.names())}) or a class path such as "
                          "tsf.rewards.Brightness") from None
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise ConfigError(f"weighted_sum: {path!r} is not a tsf.rewards.Reward subclass")
    return cls(**(init_args or {}))


def _build_term(key: str, spec: Any) -> tuple[str, Reward, float, float, float]:
    """``(label, reward, weight, shift, scale)`` of one entry of ``terms``."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        spec = {"weight": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"weighted_sum: the term {key!r} takes a weight (a number) or a mapping with weight, and "
                          f"optionally shift, scale, class_path and init_args; got {spec!r}")
    unknown = sorted(set(spec) - set(TERM_KEYS))
    if unknown:
        raise ConfigError(f"weighted_sum: the term {key!r} has unknown keys {unknown}; known: {', '.join(TERM_KEYS)}")
    if "weight" not in spec:
        raise ConfigError(f"weighted_sum: the term {key!r} has no weight")
    weight, shift, scale = float(spec["weight"]), float(spec.get("shift", 0.0)), float(spec.get("scale", 1.0))
    if scale == 0:
        raise ConfigError(f"weighted_sum: the term {key!r} has scale 0 (its value is divided by scale)")
    source = spec.get("reward", spec.get("class_path", key))
    if isinstance(source, Reward):
        reward = source
    elif isinstance(source, str) and source in REWARDS:
        reward = REWARDS.get(source)(**spec.get("init_args", {}))
    elif isinstance(source, str) and "." in source:
        reward = _import_reward(source, spec.get("init_args"))
    else:
        REWARDS.check(str(source))  # one line listing the registered names
        raise AssertionError  # (check raised)
    # a term named by its class path is labelled by its reward's name; others by their key
    label = reward.name if ("." in key and source == key) else key
    return label, reward, weight, shift, scale


class WeightedSum(Reward):
    """``r(x) = sum_i w_i (r_i(x) - shift_i) / scale_i``: a mixture of rewards with fixed weights and an optional
    fixed normalisation per term (``shift``, ``scale``: stated in the config, never estimated from samples).

    Args:
        terms: a mapping from each term to its weight. A term is a registered reward name (``digit: 1.0``) or a
            reward's class path (``tsf.rewards.Brightness: 0.5``); a term's value may instead be a mapping
            ``{weight, shift, scale, class_path, init_args}`` (``shift`` default 0, ``scale`` default 1), where
            the key is the term's label and ``class_path`` (default: the key) with ``init_args`` builds its
            reward. From Python, ``{"reward": instance, "weight": w}`` takes a built reward.
        name: the reward's name in metrics (the target's name, and the prefix of its terms in ``samples.pt``).

    ``differentiable`` is true only if every term is. Weights load lazily, term by term, on :meth:`load`.
    :meth:`features` are the first term's that has any (diversity and fidelity of a run whose feature reward
    is the mixture). Each term's raw value (before shift and scale) is what the evaluator logs
    (``target/<term>/mean``).
    """

    def __init__(self, terms: Optional[dict[str, Union[float, dict[str, Any]]]] = None,
                 name: str = "weighted_sum") -> None:
        super().__init__()
        if not isinstance(terms, dict) or not terms:
            raise ConfigError("weighted_sum needs terms: a mapping of reward names (or class paths) to weights, "
                              "e.g. {digit: 1.0, brightness: 0.5}")
        built = [_build_term(str(k), v) for k, v in terms.items()]
        labels = [b[0] for b in built]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"weighted_sum: the terms' labels must be distinct, got {labels} (use a mapping "
                              "{label: {class_path: ..., weight: ...}} to name two terms of one reward apart)")
        self.name = name
        self.labels = labels
        self.terms = nn.ModuleList([b[1] for b in built])
        self.weights = [b[2] for b in built]
        self.shifts = [b[3] for b in built]
        self.scales = [b[4] for b in built]
        self.differentiable = all(r.differentiable for r in self.terms)

    def extra_repr(self) -> str:
        return ", ".join(f"{label}: w={w:g}, shift={s:g}, scale={c:g}"
                         for label, w, s, c in zip(self.labels, self.weights, self.shifts, self.scales))

    def _load(self) -> None:
        for r in self.terms:
            r.load()

    def check_conditions(self, conditions: Sequence[Any]) -> None:
        for r in self.terms:
            r.check_conditions(conditions)

    def bind(self, model: Any) -> None:
        """Hand the base model to the terms that take it (text rewards: the model's tokenizer)."""
        for r in self.terms:
            if hasattr(r, "bind"):
                r.bind(model)

    @property
    def has_features(self) -> bool:
        return any(r.has_features for r in self.terms)

    def features(self, images: Tensor) -> Tensor:
        for r in self.terms:
            if r.has_features:
                return r.features(images)
        raise NotImplementedError(f"reward {self.name!r}: none of its terms ({', '.join(self.labels)}) has features")

    def evaluate(self, images: Tensor, conditions: Optional[Sequence[Any]] = None) -> tuple[Tensor, Tensor]:
        """``(sum [N], terms [N, number of terms])``: the sum and each term's raw value, from one call of each term."""
        values = [r(images, conditions) for r in self.terms]
        total = sum(w * (v - s) / c for v, w, s, c in zip(values, self.weights, self.shifts, self.scales))
        return total, torch.stack([v.detach().float() for v in values], 1)

    def forward(self, images: Tensor, conditions: Optional[Sequence[Any]] = None) -> Tensor:
        values = [r(images, conditions) for r in self.terms]
        return sum(w * (v - s) / c for v, w, s, c in zip(values, self.weights, self.shifts, self.scales))


REWARDS.register("weighted_sum", WeightedSum)
