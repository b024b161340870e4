"""The one view of every base model: a prior, a time grid and a transition kernel (a distribution object).

docs/algorithms.md, section 1. A sampler needs nothing else of a model: for a batch of
states ``x`` at grid point ``i`` (``i = 0`` is the prior, ``i = num_steps`` is x0)
and per-row conditions ``c``, the model gives the kernel ``p(x_{i+1} | x_i)`` as a distribution
(:class:`Transition`: a Gaussian's mean and standard deviation, or a masked model's categorical draws) and
the denoiser's estimate ``x0_hat(x_i)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from tsf.loading import LazyLoadModule

#: Rows a call is padded to on a batch-invariant model (:attr:`BaseModel.batch_invariant`): CPU BLAS
#: kernels take another path below 16 rows, which changes the last bits of every row, so without the
#: padding a sample would depend on the batch it was drawn in.
MIN_ROWS = 16


class Transition:
    """A transition kernel ``p(x_prev | x_t)`` as a distribution: what every sampler draws from.

    Members: :meth:`sample` (a draw from noise the sampler took from each sample's own stream, of the model's
    :attr:`BaseModel.noise_kind` and :attr:`BaseModel.noise_shape`), :meth:`log_prob`, :meth:`children` (``k``
    draws per row), ``x0_hat`` (the denoiser's estimate of x0, which the values use) and ``output`` (the raw
    model output, which a sampler may hand back to :meth:`BaseModel.transition` to save a forward call).
    Subclasses are dataclasses whose fields all have the batch as first dimension (:meth:`index`, :meth:`cat`).
    docs/algorithms.md, section 1 ("The kernel").
    """

    x0_hat: Tensor
    output: Tensor

    def sample(self, noise: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``log p(x | x_t)`` per row."""
        raise NotImplementedError

    @property
    def deterministic(self) -> bool:
        """Whether the kernel has no noise (its draw is its mean; a sampler then draws no noise for it)."""
        return False

    def children(self, k: int, noise: Tensor) -> Tensor:
        """``k`` draws per row, group-major (``[N * k, ...]``), from ``noise`` for ``N * k`` draws."""
        return self.sample_rows(torch.arange(len(self.x0_hat), device=self.x0_hat.device).repeat_interleave(k), noise)

    def sample_rows(self, rows: Tensor, noise: Tensor) -> Tensor:
        """One draw from the kernel of each row in ``rows`` (indices, repeats allowed), from ``noise``."""
        return self.index(rows).sample(noise)

    def index(self, idx) -> "Transition":
        return type(self)(*(getattr(self, f.name)[idx] for f in fields(self)))

    def detach(self) -> "Transition":
        return type(self)(*(getattr(self, f.name).detach() for f in fields(self)))

    @staticmethod
    def cat(parts: Sequence["Transition"]) -> "Transition":
        return type(parts[0])(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(parts[0])))


@dataclass
class GaussianTransition(Transition):
    """``p(x_prev | x_t) = N(mean, std^2 I)``; ``std`` broadcasts against ``mean`` (shape ``[N, 1, ...]``)."""

    mean: Tensor
    std: Tensor
    x0_hat: Tensor
    output: Tensor

    def sample(self, noise: Tensor) -> Tensor:
        return self.mean + self.std * noise

    def log_prob(self, x: Tensor) -> Tensor:
        return gaussian_log_prob(x, self.mean, self.std)

    @property
    def deterministic(self) -> bool:
        return float(self.std.max()) == 0

    def children(self, k: int, noise: Tensor) -> Tensor:
        return self.mean.repeat_interleave(k, 0) + self.std.repeat_interleave(k, 0) * noise

    def sample_rows(self, rows: Tensor, noise: Tensor) -> Tensor:  # (no copies of x0_hat and the model output)
        return self.mean[rows] + self.std[rows] * noise


def constant_std(s: float, like: Tensor) -> Tensor:
    """A kernel's standard deviation ``s``, the same for every row: ``[N, 1, ...]`` against ``like``.

    The kernels combine tensors with separate products and sums, never ``torch.add(a, b, alpha=s)``
    or ``addcmul``: those fuse a multiply-add in ATen's vectorised loop but not in its scalar tail, so
    an element's last bit would depend on where it falls in the batch."""
    ones = (1,) * (like.dim() - 1)
    return torch.full((1, *ones), s, dtype=like.dtype, device=like.device).expand(like.shape[0], *ones)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Log-density of ``N(mean, std^2 I)`` at ``x``, summed over all but the first dim."""
    std = std.expand_as(mean)
    var = std.square()
    lp = -0.5 * ((x - mean).square() / var + torch.log(2 * math.pi * var))
    return lp.flatten(1).sum(1)


def classifier_free_guidance(fn, x: Tensor, t: Tensor, c: Tensor, c_null: Tensor, w: float) -> Tensor:
    """``out_u + w (out_c - out_u)`` from one call of ``fn(x, t, c)`` on the rows ``[x; x]`` with
    conditions ``[c; c_null]``: every row paired with its own unconditional twin."""
    out_c, out_u = fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, c_null])).chunk(2)
    return out_u + w * (out_c - out_u)


def class_labels(conditions: Sequence[Any], num_classes: Optional[int], device) -> Tensor:
    """Class labels of per-sample conditions; ``None`` (or an unconditional model) is the null label
    ``num_classes``; a class outside ``0 .. num_classes - 1`` is a :class:`~tsf.errors.ConfigError`."""
    from tsf.errors import ConfigError

    null = num_classes if num_classes is not None else 0
    labels = []
    for c in conditions:
        if c is None or num_classes is None:
            labels.append(null)
            continue
        if not 0 <= int(c) < num_classes:
            raise ConfigError(f"class {c} outside 0-{num_classes - 1}")
        labels.append(int(c))
    return torch.tensor(labels, dtype=torch.long, device=device)


class BaseModel(LazyLoadModule):
    """Base model behind the kernel interface (Gaussian by default; :mod:`tsf.models.masked` for discrete).

    Subclasses implement :meth:`forward` (one network evaluation, the unit of NFE),
    :meth:`x0_hat`, :meth:`transition` and :meth:`decode`; weights load in
    :meth:`load` so that constructing a model (for instance while a config is
    validated) never reads a weight file.
    """

    #: shape of one state x, without the batch dimension
    sample_shape: tuple[int, ...]
    #: number of transitions from the prior to x0
    num_steps: int
    #: whether :meth:`decode` returns images
    has_images: bool = True
    #: whether the kernel is Gaussian (gradient methods move its mean: TDS, DAS, DPS, the tweedie proposal);
    #: a discrete (masked) model's is a categorical one
    gaussian_kernel: bool = True
    #: the noise a kernel draw takes from each sample's stream: ``normal`` (Gaussian kernels) or ``uniform``
    #: (categorical draws by inverse CDF), of shape :attr:`noise_shape` per row
    noise_kind: str = "normal"
    #: whether samplers pad every network, decoder and reward call on fewer than :data:`MIN_ROWS`
    #: rows up to that many (the padding is computed, then dropped, and never counted as NFE), so
    #: that a sample's result is bitwise the same whatever batch, chunk or process it is drawn in.
    #: On by default only for the small models (digits, mixtures), where it costs almost nothing;
    #: a real pipeline computes only the rows the method needs unless its ``batch_invariant`` is set.
    batch_invariant: bool = False

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Shape of one row's noise for :meth:`prior` and for a kernel draw (a Gaussian model's: its states')."""
        return tuple(self.sample_shape)

    def value_input(self, x: Tensor) -> Tensor:
        """What a learned value network sees of states ``x`` (``value_dim`` floats per row): the states themselves."""
        return x

    @property
    def value_dim(self) -> int:
        return math.prod(self.sample_shape)

    def random_noise(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` rows of the kernel's kind of noise from ``generator`` (outside a sampler, e.g. the reward check)."""
        fill = torch.randn if self.noise_kind == "normal" else torch.rand
        return fill(n, *self.noise_shape, generator=generator)

    @property
    def min_rows(self) -> int:
        """Rows below which a call is padded (1: never)."""
        return MIN_ROWS if self.batch_invariant else 1

    def network(self) -> Optional[nn.Module]:
        """The module whose forward is one network evaluation (the denoiser; ``compute/model_rows``
        counts the rows it sees, classifier-free guidance's doubled rows and any padding included)."""
        net = getattr(self, "net", None)
        return net if isinstance(net, nn.Module) else None

    @property
    def is_stochastic(self) -> bool:
        """Whether the kernel has noise (particle methods need stochastic children)."""
        return True

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def cache_key(self) -> str:
        """A string that identifies this model's distribution (for cached reference sets)."""
        return repr(self)

    # -- conditions -----------------------------------------------------------------
    def check_conditions(self, conditions: Sequence[Any]) -> None:
        """Raise a :class:`~tsf.errors.ConfigError` for conditions the model cannot take (reads no weights)."""
        self.encode_conditions(conditions)

    def encode_conditions(self, conditions: Sequence[Any]) -> Tensor:
        """Map a list of per-sample conditions (a class, a prompt, None) to a per-row tensor."""
        return torch.zeros(len(conditions), device=self.device)

    # -- the kernel -----------------------------------------------------------------
    def prior(self, noise: Tensor) -> Tensor:
        """``x`` at grid point 0 from ``noise`` of shape ``[N, *noise_shape]`` (standard normal for a Gaussian model)."""
        return noise

    def forward(self, x: Tensor, i: int, c: Tensor) -> Tensor:  # pragma: no cover - abstract
        """One network evaluation at grid point ``i`` (the unit of NFE)."""
        raise NotImplementedError

    def x0_hat(self, x: Tensor, i: int, output: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def transition(self, x: Tensor, i: int, c: Tensor, output: Optional[Tensor] = None) -> Transition:
        raise NotImplementedError  # pragma: no cover - abstract

    def tweedie_jacobian(self, i: int) -> float:
        """``d x0_hat / d x`` at grid point ``i`` with the network's output held constant: one number, since
        ``x0_hat`` is then affine in ``x`` with a scalar slope (eps prediction ``1 / sqrt(abar)``, v prediction
        ``sqrt(abar)``, a flow ``1 / c_s``: docs/algorithms.md, section 4, "The gradient through the Tweedie
        estimate"). What ``gradient_through: tweedie`` multiplies ``grad_{x0} r(x0_hat)`` by."""
        from tsf.errors import ConfigError

        raise ConfigError(f"{type(self).__name__} does not give d x0_hat / d x with its network output held constant "
                          "(tweedie_jacobian), which gradient_through: tweedie needs; use gradient_through: network")

    def step_std(self, i: int) -> Optional[float]:
        """The kernel's standard deviation at step ``i`` (from grid point ``i`` to ``i + 1``) when it is the same
        for every row, ``None`` when the model does not say (a sampler then assumes it may be > 0). A sampler
        uses it to skip work that only a noisy step needs, e.g. SMC's gradient for a deterministic last step."""
        return None

    def marginal(self, i: int) -> tuple[float, float]:
        """``(a_i, s_i)`` of the forward process at grid point ``i`` (``0 .. num_steps``): the states there are
        ``x_i = a_i x0 + s_i eps``. A model that does not say has no :meth:`renoise`."""
        raise NotImplementedError(f"{type(self).__name__} does not give its forward process (marginal)")

    def renoise(self, x: Tensor, i: int, j: int, noise: Tensor) -> Tensor:
        """States ``x`` at grid point ``i`` noised forward to the noisier grid point ``j <= i`` by the forward process,
        ``q(x_j | x_i) = N((a_j / a_i) x, (s_j^2 - (a_j / a_i)^2 s_i^2) I)``, which keeps the marginals: from
        ``x_i = a_i x0 + s_i eps`` it gives ``a_j x0 + s_j eps'``. ``noise`` is standard normal like ``x``;
        ``j = i`` returns ``x``."""
        if not 0 <= j <= i <= self.num_steps:
            raise ValueError(f"renoise goes from grid point i to a noisier j <= i in 0 .. {self.num_steps}, "
                             f"got {i} -> {j}")
        if j == i:
            return x
        (a_i, s_i), (a_j, s_j) = self.marginal(i), self.marginal(j)
        ratio = a_j / a_i
        std = math.sqrt(max(s_j * s_j - ratio * ratio * s_i * s_i, 0.0))
        return x * ratio + noise * std  # separate products, no fused multiply-add (see constant_std)

    def log_prob(self, x_prev: Tensor, transition: Transition) -> Tensor:
        """``log p(x_prev | x_t)`` per row (summed over dimensions): the kernel's own :meth:`Transition.log_prob`."""
        return transition.log_prob(x_prev)

    def decode(self, x0: Tensor) -> Tensor:
        """Images in [0, 1] (``[N, C, H, W]``) from final states."""
        return x0
