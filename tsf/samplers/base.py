"""What every sampler shares: the output type, per-sample randomness, compute counting, chunking.

A sampler is plain PyTorch: ``sampler.sample(model, reward, conditions, sample_ids, seed)``
returns a :class:`SampleBatch`. Subclasses implement :meth:`Sampler._sample` on
particles of shape ``[B * K, ...]`` (``B`` outputs, ``K`` particles each, group-major).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from tsf.errors import ConfigError
from tsf.models.base import MIN_ROWS, BaseModel, Transition  # noqa: F401  (MIN_ROWS: re-exported)
from tsf.registry import Registry
from tsf.rewards.base import Reward

#: What a sampler call spends (totals over its outputs; the CLI reports them per sample):
#: ``nfe``: model evaluations of particles, as the papers count them: a guided (CFG) evaluation of one
#: particle is one NFE, padding excluded; ``nfe_grad``: those that built a graph for a backward;
#: ``reward_calls`` / ``reward_grad_calls``: rows scored by the reward (decoded x0 or Tweedie estimates);
#: ``model_rows``: rows the network really computed (classifier-free guidance's doubled rows and any
#: batch-invariance padding included: the number to compare with another codebase's UNet batch rows);
#: ``decode_rows`` / ``reward_rows``: rows through the decoder (VAE) and the reward, padding included,
#: the final decode of the outputs too; ``seconds``: wall time.
COMPUTE_KEYS = ("nfe", "nfe_grad", "reward_calls", "reward_grad_calls", "model_rows", "decode_rows", "reward_rows",
                "seconds")


@dataclass
class SampleBatch:
    """``B`` final samples. ``compute`` holds **totals over the batch** (``compute["nfe"]`` is the NFE of
    all ``B`` outputs); :attr:`compute_per_sample` divides by ``B``, which is what the CLI's metrics
    (``compute/nfe``, ...) report. ``diagnostics`` are the sampler's own (SMC: ``log_z``,
    ``ess_fraction``, ``resampled``), tensors with one row per output in the order of ``sample_ids``."""

    x0: Tensor
    sample_ids: Tensor
    images: Optional[Tensor] = None
    rewards: Optional[Tensor] = None
    compute: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.x0.shape[0]

    @property
    def compute_per_sample(self) -> dict[str, float]:
        """``compute`` per output sample: the numbers of ``metrics.json``'s ``compute/*`` keys."""
        return {k: v / max(len(self), 1) for k, v in self.compute.items()}


# ----------------------------------------------------------------------------- randomness
def sample_seed(seed: int, sample_id: int) -> int:
    """The seed of sample ``sample_id`` of a run with ``seed`` (well mixed, 63 bits)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(sample_id)]).generate_state(2, np.uint64)[0]) >> 1


class Noise:
    """One random stream per output sample: all noise of sample ``i`` comes from its own generator,
    seeded by ``(seed, i)``, so results do not depend on batch size, chunking or the number of processes.

    The streams are read in bulk: each sample's generator fills a block of numbers at a time (normal
    and uniform ones in blocks of their own) and a draw takes the next numbers of every sample's
    block with one slice, rather than one generator call per sample. A block holds
    ``max(block, what the draw lacks)`` numbers, a rule that depends on the sample's own draws
    alone, so sample ``i``'s noise is still a function of ``(seed, i)`` and its own draws.

    The generators are CPU generators whatever the device (the diffusers habit): a draw is one
    copy to the device rather than a kernel launch per sample, and sample ``i`` gets the same
    noise on a CPU and on a GPU.
    """

    #: numbers per block and sample: normal (the states' noise) and uniform (selection, resampling)
    BLOCKS = {"normal": 8192, "uniform": 256}

    def __init__(self, seed: int, sample_ids: Sequence[int], device: torch.device) -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in sample_ids]
        self._streams: dict[tuple[str, torch.dtype], _Stream] = {}

    def _stream(self, kind: str, dtype: torch.dtype) -> "_Stream":
        key = (kind, dtype)
        if key not in self._streams:
            self._streams[key] = _Stream(self.generators, kind, dtype, self.BLOCKS[kind])
        return self._streams[key]

    def _to_device(self, x: Tensor) -> Tensor:
        return x if self.device.type == "cpu" else x.to(self.device, non_blocking=True)

    def randn(self, k: int, shape: Sequence[int], dtype=torch.float32) -> Tensor:
        """Standard normal ``[B * k, *shape]`` (group-major)."""
        n = int(k) * math.prod(shape)
        return self._to_device(self._stream("normal", dtype).take(n).reshape(len(self.generators) * k, *shape))

    def randn_counts(self, counts: Sequence[int], shape: Sequence[int], dtype=torch.float32) -> Tensor:
        """Standard normal rows, ``counts[b]`` of them from sample ``b``'s stream, concatenated."""
        d = math.prod(shape)
        flat = self._stream("normal", dtype).take_counts([int(k) * d for k in counts])
        return self._to_device(flat.reshape(-1, *shape))

    def uniform(self, k: int, shape: Sequence[int], dtype=torch.float32) -> Tensor:
        """Uniform on [0, 1), ``[B * k, *shape]`` (group-major), from the same stream as :meth:`rand`."""
        n = int(k) * math.prod(shape)
        return self._to_device(self._stream("uniform", dtype).take(n).reshape(len(self.generators) * k, *shape))

    def for_kernel(self, model: BaseModel, k: int) -> Tensor:
        """Noise for ``k`` kernel draws (or prior states) per sample: the model's :attr:`~BaseModel.noise_kind` of
        shape :attr:`~BaseModel.noise_shape` (standard normal for a Gaussian model)."""
        if model.noise_kind == "normal":
            return self.randn(k, model.noise_shape)
        return self.uniform(k, model.noise_shape)

    def for_kernel_counts(self, model: BaseModel, counts: Sequence[int]) -> Tensor:
        """Kernel noise, ``counts[b]`` rows from sample ``b``'s stream, concatenated."""
        if model.noise_kind == "normal":
            return self.randn_counts(counts, model.noise_shape)
        d = math.prod(model.noise_shape)
        flat = self._stream("uniform", torch.float32).take_counts([int(k) * d for k in counts])
        return self._to_device(flat.reshape(-1, *model.noise_shape))

    def rand(self, k: int, dtype=torch.float32) -> Tensor:
        """Uniform ``[B, k]``."""
        return self._to_device(self._stream("uniform", dtype).take(int(k)).reshape(len(self.generators), k))


_POOL: list = []


def _fill_rows(fill: Callable, generators: list, out: Tensor) -> None:
    """Row ``b`` of ``out`` from generator ``b``; large fills on the CPU's torch threads in parallel
    (each generator stays on one thread, so the numbers are the serial ones)."""
    workers = min(torch.get_num_threads(), 8, len(generators))
    if workers < 2 or out.numel() < (1 << 17):
        for b, g in enumerate(generators):
            fill(g, out.shape[1], out=out[b])
        return
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor

        _POOL.append(ThreadPoolExecutor(max_workers=8, thread_name_prefix="tsf-noise"))

    def part(j: int) -> None:
        for b in range(j, len(generators), workers):
            fill(generators[b], out.shape[1], out=out[b])

    list(_POOL[0].map(part, range(workers)))


class _Stream:
    """The unread numbers of one kind (``normal``/``uniform``, one dtype) of every sample's stream.

    They sit in one ``[B, L]`` buffer: while every sample has drawn the same amounts, row ``b``'s unread
    numbers are the whole row (a draw is a slice); after a draw of different counts per sample
    (``take_counts``), they are ``buf[b, start[b]:end[b]]`` and a draw is one gather, whatever ``B``.
    """

    def __init__(self, generators: list, kind: str, dtype: torch.dtype, block: int) -> None:
        self.generators, self.dtype, self.block = generators, dtype, block
        self.fill = torch.randn if kind == "normal" else torch.rand
        self.buf = torch.empty(len(generators), 0, dtype=dtype)
        self.start: Optional[Tensor] = None  # per sample, once counts differ (with ``end``)
        self.end: Optional[Tensor] = None

    def _fill(self, g: torch.Generator, n: int, out: Optional[Tensor] = None) -> Tensor:
        return self.fill(n, generator=g, dtype=self.dtype, out=out)

    def take(self, n: int) -> Tensor:
        """The next ``n`` numbers of every sample, ``[B, n]``."""
        if self.start is not None:
            return self.take_counts([n] * len(self.generators)).view(len(self.generators), n)
        have = self.buf.shape[1]
        if have < n:
            size = max(self.block, n - have)
            new = torch.empty(len(self.generators), have + size, dtype=self.dtype)
            new[:, :have] = self.buf
            _fill_rows(self._fill, self.generators, new[:, have:])
            self.buf = new
        out, self.buf = self.buf[:, :n], self.buf[:, n:]
        return out

    def take_counts(self, counts: list[int]) -> Tensor:
        """The next ``counts[b]`` numbers of sample ``b``, concatenated."""
        if self.start is None:
            if len(set(counts)) <= 1:
                return self.take(counts[0] if counts else 0).reshape(-1)
            B, have = self.buf.shape
            self.start, self.end = torch.zeros(B, dtype=torch.long), torch.full((B,), have, dtype=torch.long)
        need = torch.as_tensor(counts, dtype=torch.long)
        short = (self.end - self.start < need).nonzero().flatten().tolist()
        if short:
            self._refill(short, need)
        rows = torch.repeat_interleave(torch.arange(len(counts)), need)
        first = torch.cumsum(need, 0) - need  # where each sample's numbers begin in the output
        cols = self.start[rows] + torch.arange(len(rows)) - first[rows]
        self.start += need
        return self.buf[rows, cols]

    def _refill(self, short: list[int], need: Tensor) -> None:
        """Each short sample's generator draws ``max(block, what the draw lacks)`` more numbers (the rule of
        :meth:`take`), appended to its row; the rows are compacted to their unread numbers first."""
        have = self.end - self.start
        sizes = {b: max(self.block, int(need[b] - have[b])) for b in short}
        width = int(max(int(have.max()), max(int(have[b]) + n for b, n in sizes.items())))
        new = torch.empty(len(self.generators), width, dtype=self.dtype)
        for b in range(len(self.generators)):
            new[b, :have[b]] = self.buf[b, self.start[b]:self.end[b]]
        for b, n in sizes.items():
            self._fill(self.generators[b], n, out=new[b, have[b]:have[b] + n])
        self.buf, self.start = new, torch.zeros_like(self.start)
        self.end = have.clone()
        for b, n in sizes.items():
            self.end[b] += n


# ----------------------------------------------------------------------------- compute
@contextlib.contextmanager
def counting_calls(obj: Any, name: str, count: Callable[[Any], None]):
    """``obj.<name>`` wrapped while the block runs, ``count(first argument)`` before each call (for a
    method that is not a module's forward, e.g. ``model.decode`` or ``vae.decode``); what was there
    before, the method or an instance attribute of that name, is put back on exit."""
    method, own = getattr(obj, name), obj.__dict__.get(name)

    def counted(x, *args, **kwargs):
        count(x)
        return method(x, *args, **kwargs)

    setattr(obj, name, counted)
    try:
        yield
    finally:
        if own is not None:
            setattr(obj, name, own)
        else:
            delattr(obj, name)


class ComputeCounter:
    """Counts the calls of the model, its network, its decoder and the reward with hooks, never by formula.

    One model forward on ``n`` rows is ``n`` NFE; if it builds a graph (for a backward) it
    also counts ``n`` in ``nfe_grad``. Reward calls likewise (``reward_grad_calls``). Padding rows
    are left out of those and counted in ``model_rows``, ``decode_rows`` and ``reward_rows``, the
    rows really computed (see :data:`COMPUTE_KEYS`).
    """

    def __init__(self, model: BaseModel, reward: Optional[Reward]) -> None:
        self.model, self.reward = model, reward
        self.counts = dict.fromkeys(COMPUTE_KEYS, 0.0)

    def _hook(self, calls: str, grad_calls: str, rows: Optional[str] = None) -> Callable:
        def hook(module, args, output):
            n = args[0].shape[0]
            self.counts[calls] += n - _PADDING.get()
            if torch.is_tensor(output) and output.requires_grad:
                self.counts[grad_calls] += n - _PADDING.get()
            if rows is not None:
                self.counts[rows] += n

        return hook

    def _rows_hook(self, key: str) -> Callable:
        def hook(module, args, kwargs, output):
            first = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
            self.counts[key] += 0 if first is None else first.shape[0]

        return hook

    def _add_decoded(self, x0: Tensor) -> None:
        self.counts["decode_rows"] += x0.shape[0]

    def __enter__(self) -> "ComputeCounter":
        self._stack = contextlib.ExitStack()
        handles = [self.model.register_forward_hook(self._hook("nfe", "nfe_grad"))]
        net = self.model.network()
        if net is not None:
            handles.append(net.register_forward_hook(self._rows_hook("model_rows"), with_kwargs=True))
        if self.reward is not None:
            handles.append(self.reward.register_forward_hook(
                self._hook("reward_calls", "reward_grad_calls", "reward_rows")))
        for h in handles:
            self._stack.callback(h.remove)
        self._stack.enter_context(counting_calls(self.model, "decode", self._add_decoded))
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def __exit__(self, *exc) -> None:
        self._sync()
        self.counts["seconds"] += time.perf_counter() - self._t0
        self._stack.close()


# ----------------------------------------------------------------------------- chunking
_PADDING: contextvars.ContextVar[int] = contextvars.ContextVar("tsf_padding_rows", default=0)


def _pad(a: Any, n: int) -> Any:
    if a is None:
        return None
    if torch.is_tensor(a):
        return torch.cat([a, a[-1:].expand(n - len(a), *a.shape[1:])])
    return list(a) + [a[-1]] * (n - len(a))


def chunked(fn: Callable[..., Any], max_batch: int, *args: Any, min_rows: int = 1) -> Any:
    """``fn(*args)`` on row chunks of at most ``max_batch`` rows, outputs concatenated.

    ``args`` are tensors or lists (conditions) of the same length; ``fn`` returns a
    tensor, a :class:`Transition` or a tuple of those (or ``None``). Chunks of fewer
    than ``min_rows`` rows are padded (and the padding is sliced off again): with
    ``min_rows = MIN_ROWS`` (a batch-invariant model's :attr:`~tsf.models.base.BaseModel.min_rows`)
    a row's result does not depend on which rows share its call.
    """
    n = len(args[0])
    outs = []
    for s in range(0, n, max_batch):
        part = [a[s:s + max_batch] if a is not None else None for a in args]
        m = len(part[0])
        if m < min_rows:
            token = _PADDING.set(min_rows - m)
            try:
                out = fn(*(_pad(a, min_rows) for a in part))
            finally:
                _PADDING.reset(token)
            out = _rows(out, slice(0, m))
        else:
            out = fn(*part)
        outs.append(out)
    return outs[0] if len(outs) == 1 else _cat(outs)


def _rows(out: Any, idx: slice) -> Any:
    if out is None:
        return None
    if isinstance(out, Transition):
        return out.index(idx)
    if isinstance(out, tuple):
        return tuple(_rows(o, idx) for o in out)
    return out[idx]


def _cat(outs: list) -> Any:
    if outs[0] is None:
        return None
    if isinstance(outs[0], Transition):
        return Transition.cat(outs)
    if isinstance(outs[0], tuple):
        return tuple(_cat([o[j] for o in outs]) for j in range(len(outs[0])))
    return torch.cat(outs)


SAMPLERS: Registry["Sampler"] = Registry("sampler")


GRADIENT_THROUGH = ("network", "tweedie")

#: the samplers that run on a discrete (masked) kernel: derivative-free, they use only the kernel's draws
DISCRETE_SAMPLERS = ("base", "best_of_n", "svdd", "smc", "code", "sop", "rbf")


def check_gradient_through(gradient_through: str, value_fn: Any) -> str:
    """``gradient_through`` of a gradient sampler (SMC's gradient proposal, DPS), refused (a :class:`ConfigError`)
    unless it is ``network`` or ``tweedie``, and ``tweedie`` with a value other than the posterior mean (only
    that value is the reward of a Tweedie estimate)."""
    if gradient_through not in GRADIENT_THROUGH:
        raise ConfigError(f"unknown gradient_through {gradient_through!r}; known: {', '.join(GRADIENT_THROUGH)}")
    if gradient_through == "tweedie" and not hasattr(value_fn, "tweedie_gradient"):
        raise ConfigError(f"gradient_through: tweedie differentiates the reward of the Tweedie estimate, which is the "
                          f"posterior-mean value; the value {type(value_fn).__name__} has no Tweedie estimate: use "
                          "value: posterior_mean, or gradient_through: network")
    return gradient_through


def integer_at_least(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int, refused (a :class:`ConfigError` naming ``name``) unless it is an integer ``>= minimum``."""
    if int(value) != value or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


class Sampler:
    """Base class of all samplers.

    Args:
        num_particles: K, particles (or candidates) per output sample.
        max_batch: most rows in one model or reward call; bounds memory.
    """

    #: short name used in run names, figures and the registry
    name: str = "sampler"
    #: whether the sampler needs the reward (the base sampler does not)
    uses_reward: bool = True
    #: whether the sampler branches particles from one state (needs a stochastic kernel)
    needs_stochastic_kernel: bool = False
    #: whether the sampler moves a Gaussian kernel's mean or its noise (gradient proposals, DPS, noise search):
    #: such a sampler refuses a discrete (masked) model
    needs_gaussian_kernel: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            SAMPLERS.register(cls.name, cls)

    def __init__(self, num_particles: int = 1, max_batch: int = 4096) -> None:
        self.num_particles = integer_at_least("num_particles", num_particles, 1)
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = int(max_batch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_particles={self.num_particles})"

    @classmethod
    def for_budget(cls, budget: int, num_steps: int) -> dict:
        """Init arguments that spend about ``budget`` NFE per sample on a ``num_steps`` grid
        (used to compare methods at equal compute); ``{}`` when the cost is fixed."""
        return {}

    # -- the public entry point -------------------------------------------------------
    def sample(self, model: BaseModel, reward: Optional[Reward], conditions: Sequence[Any],
               sample_ids: Sequence[int] | Tensor, seed: int = 0) -> SampleBatch:
        """Draw one output per ``(condition, sample_id)``; noise of sample ``i`` from ``(seed, i)``."""
        sample_ids = torch.as_tensor(sample_ids, dtype=torch.long).reshape(-1)
        conditions = list(conditions)
        if len(conditions) != len(sample_ids):
            raise ConfigError(f"{len(conditions)} conditions for {len(sample_ids)} sample ids")
        reward = self.guide(model, reward)
        if self.uses_reward and reward is None:
            raise ConfigError(f"sampler {self.name!r} needs a reward")
        if self.needs_stochastic_kernel and not model.is_stochastic:
            raise ConfigError(
                f"sampler {self.name!r} draws several children from one state, but {type(model).__name__}'s kernel "
                "is deterministic (all children would be identical): use a stochastic kernel, e.g. "
                "diffusion: square (Linear-SDE) or interpolant: vp for a flow model, eta > 0 for DDIM; "
                "Best-of-N is the method for a deterministic (ODE) sampler"
            )
        if self.needs_gaussian_kernel and not model.gaussian_kernel:
            raise ConfigError(
                f"sampler {self.name!r} ({self!r}) moves a Gaussian kernel (a reward gradient or a search over "
                f"Gaussian noise) and {type(model).__name__}'s kernel is discrete: the derivative-free samplers apply: "
                f"{', '.join(DISCRETE_SAMPLERS)} (smc with proposal: base)")
        model.load()
        if reward is not None:
            reward.load()
        noise = Noise(seed, sample_ids.tolist(), model.device)
        with torch.no_grad():
            c = model.encode_conditions(conditions)
        with ComputeCounter(model, reward if self.uses_reward else None) as counter:
            out = self._sample(model, reward, conditions, c, noise)
            x0, rewards, diagnostics, images = (*out, None)[:4] if isinstance(out, tuple) else (out, None, {}, None)
            if model.has_images and images is None:  # a selecting sampler hands back its choice's images
                with torch.no_grad():
                    images = chunked(model.decode, self.max_batch, x0.detach(), min_rows=model.min_rows)
        return SampleBatch(x0=x0.detach(), sample_ids=sample_ids, images=images,
                           rewards=None if rewards is None else rewards.detach(),
                           compute=counter.counts, diagnostics=diagnostics)

    def guide(self, model: BaseModel, reward: Optional[Reward]) -> Optional[Reward]:
        """The reward the sampler scores with, handed to :meth:`_sample` and counted in ``reward_calls``: the
        target reward, or a search's own verifier (Best-of-N's and zero-order search's ``verifier``)."""
        return reward

    def _sample(self, model: BaseModel, reward: Optional[Reward], conditions: list, c: Tensor, noise: Noise):
        """Return ``x0 [B, ...]`` or ``(x0, rewards [B] or None, diagnostics[, images])``: the images of
        ``x0`` when the sampler decoded them already (they are not decoded again)."""
        raise NotImplementedError

    # -- helpers for subclasses --------------------------------------------------------
    def transition(self, model: BaseModel, x: Tensor, i: int, c: Tensor,
                   output: Optional[Tensor] = None) -> Transition:
        """The model's kernel at grid point ``i`` on rows of ``x``, in chunks of ``max_batch``; ``output`` is the
        model output at those rows or the kernel itself (a value's ``kernel=True`` result), returned as it is."""
        if isinstance(output, Transition):
            return output
        if output is None:
            return chunked(lambda xs, cs: model.transition(xs, i, cs), self.max_batch, x, c, min_rows=model.min_rows)
        return chunked(lambda xs, cs, os: model.transition(xs, i, cs, os), self.max_batch, x, c, output,
                       min_rows=model.min_rows)

    def score(self, model: BaseModel, reward: Reward, x0: Tensor, conditions: list, with_images: bool = False):
        """``r(decode(x0), c)`` per row, in chunks of ``max_batch``; with ``with_images``, ``(r, images)``."""
        if not with_images:
            return chunked(lambda xs, cs: reward(model.decode(xs), cs), self.max_batch, x0, conditions,
                           min_rows=model.min_rows)

        def scored(xs, cs):
            images = model.decode(xs)
            return reward(images, cs), images

        return chunked(scored, self.max_batch, x0, conditions, min_rows=model.min_rows)

    def final_value(self, model: BaseModel, reward: Reward, x0: Tensor, conditions: list,
                    value: Optional[Callable[[], Tensor]] = None) -> tuple[Tensor, Optional[Tensor]]:
        """The reward of candidate outputs ``x0`` (the value at the last grid point): ``(r, images or None)``.
        An image model's decoded images are kept, so that the chosen outputs need no second decode; for
        other models ``value()`` (the sampler's value function at the last grid point), if given, decides."""
        if model.has_images:
            return self.score(model, reward, x0, conditions, with_images=True)
        return (self.score(model, reward, x0, conditions) if value is None else value()), None

    def value(self, model: BaseModel, reward: Reward, value_fn, x: Tensor, i: int, c: Tensor, conditions: list,
              alpha: float, grad: bool = False, grad_batch: Optional[int] = None, through: str = "network",
              kernel: bool = False):
        """``(v, model output or None, dv/dx or None)`` at grid point ``i`` for the rows of ``x``.

        With ``grad`` the value is differentiated in chunks of ``grad_batch`` rows: through the model,
        the decoder and the reward (``through = "network"``), or, for the posterior-mean value, through
        the Tweedie estimate with the network output held constant (``"tweedie"``: no graph through the
        network, see :meth:`~tsf.samplers.value.PosteriorMeanValue.tweedie_gradient`). With ``kernel``, a value
        that calls the model returns the kernel at grid point ``i`` in place of the model output (for
        :meth:`transition`: the Tweedie estimate is then computed once for both).
        """
        extra = {"kernel": True} if kernel and value_fn.calls_model else {}
        if not grad:
            with torch.no_grad():
                return chunked(lambda xs, cs, ks: (*value_fn(model, reward, xs, i, cs, ks, alpha, **extra), None),
                               self.max_batch, x, c, conditions, min_rows=model.min_rows)
        if through == "tweedie":
            return chunked(lambda xs, cs, ks: value_fn.tweedie_gradient(model, reward, xs, i, cs, ks, **extra),
                           grad_batch or self.max_batch, x, c, conditions, min_rows=model.min_rows)

        def with_grad(xs, cs, ks):
            with torch.enable_grad():
                xs = xs.detach().requires_grad_(True)
                v, out = value_fn(model, reward, xs, i, cs, ks, alpha, **extra)
                (g,) = torch.autograd.grad(v.sum(), xs, allow_unused=True)
            g = torch.zeros_like(xs) if g is None else g
            return v.detach(), None if out is None else out.detach(), g.detach()

        return chunked(with_grad, grad_batch or self.max_batch, x, c, conditions, min_rows=model.min_rows)

    @staticmethod
    def repeat(conditions: list, c: Tensor, k: int) -> tuple[list, Tensor]:
        """Conditions for ``B * k`` group-major particle rows."""
        return [cond for cond in conditions for _ in range(k)], c.repeat_interleave(k, dim=0)


class BaseSampler(Sampler):
    """Plain sampling from the base model: one trajectory of the model's kernel per sample."""

    name = "base"
    uses_reward = False

    def __init__(self, max_batch: int = 4096) -> None:
        super().__init__(num_particles=1, max_batch=max_batch)

    @torch.no_grad()
    def trajectories(self, model: BaseModel, c: Tensor, noise: Noise, k: int) -> Tensor:
        """``k`` independent base trajectories per sample, ``[B * k, ...]``."""
        x = model.prior(noise.for_kernel(model, k))
        for i in range(model.num_steps):
            x = self.transition(model, x, i, c).sample(noise.for_kernel(model, k))
        return x

    def _sample(self, model, reward, conditions, c, noise):
        return self.trajectories(model, c, noise, 1)
