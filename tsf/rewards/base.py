"""The reward interface: ``reward(images, conditions) -> float tensor [N]``, images in [0, 1]."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from tsf.errors import ConfigError
from tsf.loading import LazyLoadModule
from tsf.registry import Registry


class Reward(LazyLoadModule):
    """A reward ``r(images, conditions) -> [N]``.

    ``differentiable`` says whether gradients flow from the output to ``images``
    (gradient samplers refuse rewards without it). Weights load in :meth:`load`.
    A reward may expose :meth:`features` (``[N, d]``) for diversity and fidelity.
    """

    name: str = "reward"
    differentiable: bool = False

    def check_conditions(self, conditions: Sequence[Any]) -> None:
        """Raise a :class:`~tsf.errors.ConfigError` if the reward cannot score these conditions."""

    @property
    def has_features(self) -> bool:
        return type(self).features is not Reward.features

    def features(self, images: Tensor) -> Tensor:
        raise NotImplementedError(f"reward {self.name!r} has no feature extractor")

    def forward(self, images: Tensor, conditions: Optional[Sequence[Any]] = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


REWARDS: Registry[Reward] = Registry("reward")


def describe(reward: Reward) -> str:
    """``reward 'name' (module.Class)``: how errors name a reward."""
    return f"reward {reward.name!r} ({type(reward).__module__}.{type(reward).__qualname__})"


def require_differentiable(reward: Reward, sampler: str) -> None:
    """Refuse a reward without ``differentiable = True`` for a sampler that follows its gradient."""
    if not reward.differentiable:
        raise ConfigError(
            f"{sampler} follows the reward's gradient, and {describe(reward)} is not marked differentiable: set "
            "`differentiable = True` on the class if its forward is differentiable torch code (gradients flow from "
            "its output to the images), or choose a sampler that needs no gradient (best_of_n, svdd, smc, fk)")


def check_reward(reward: Reward, images: Tensor, conditions: Sequence[Any]) -> None:
    """Call ``reward`` on a few real ``images`` (with their ``conditions``) and refuse, in one line that says
    what to change, an output the samplers cannot use: not a tensor, not of shape ``[N]``, not floating
    point, or (for a reward marked ``differentiable``) an output that carries no gradient to the images."""
    n, where = len(images), describe(reward)
    x = images.detach().clone().requires_grad_(reward.differentiable)
    try:
        with torch.enable_grad() if reward.differentiable else torch.no_grad():
            out = reward(x, list(conditions))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - an error inside a user's forward becomes one line
        raise ConfigError(f"{where} raised {type(e).__name__} in its forward, called before sampling on {n} images "
                          f"({images.dtype}, {images.device}): {_first_line(e)}; {_likely_cause(e)}") from None
    must = f"forward(images, conditions) must return a float tensor of shape [N], one reward per image (here [{n}])"
    if not torch.is_tensor(out):
        raise ConfigError(f"{where} returned a {type(out).__name__}; {must}")
    if tuple(out.shape) != (n,):
        hint = ("; it returned one number for the whole batch (do not reduce over images, e.g. no .mean())"
                if out.dim() == 0 else "; drop the last dimension (out[:, 0] or out.squeeze(-1))"
                if tuple(out.shape) == (n, 1) else "")
        raise ConfigError(f"{where} returned shape {list(out.shape)} for {n} images; {must}{hint}")
    if not out.is_floating_point():
        raise ConfigError(f"{where} returned dtype {out.dtype}; {must} (e.g. .float())")
    if out.dtype != torch.float32:
        import sys

        print(f"tsf: note: {where} returns {str(out.dtype).replace('torch.', '')}; tsf casts its rewards to "
              "float32 where it stores or compares them", file=sys.stderr)
    if reward.differentiable:
        grad = torch.autograd.grad(out.sum(), x, allow_unused=True)[0] if out.requires_grad else None
        if grad is None:
            raise ConfigError(
                f"{where} is marked `differentiable = True` but its output carries no gradient to the images "
                "(computed under torch.no_grad, detached, or through numpy / .item()): keep its forward in "
                "differentiable torch operations, or set `differentiable = False` (gradient samplers then refuse it)")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else "(no message)"


def _likely_cause(e: Exception) -> str:
    """What most often raises inside a reward's forward, from the error's message."""
    msg = str(e)
    if "dtype" in msg or "same type" in msg or "Half" in msg or "BFloat16" in msg:
        return ("likely a dtype mismatch: the images come as float32 in [0, 1]; cast them to your network's dtype "
                "inside forward (images.to(next(self.parameters()).dtype)), or keep the network in float32")
    if "CUDA" in msg or "device" in msg or "cuda" in msg:
        return ("likely a device mismatch: keep every tensor on images.device (the run's device), e.g. "
                "torch.tensor(..., device=images.device), and move weights in load()/to() rather than to a fixed device")
    if "shape" in msg or "size" in msg:
        return "likely a shape mismatch: the images are [N, C, H, W] (C = 1 on digits, 3 for RGB) in [0, 1]"
    return "the error is inside the reward's own forward (run it on such images to see the traceback)"


def build_reward(spec: Any) -> Reward:
    """A registered name (``"digit"``) or a :class:`Reward` instance (e.g. from a config's ``class_path``)."""
    reward = REWARDS.build(spec)
    if not isinstance(reward, Reward):
        raise ConfigError(f"a reward must be a registered name or a tsf.rewards.Reward, got {type(reward).__name__}")
    return reward
