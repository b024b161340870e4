"""The embedded default: small models trained by tsf on scikit-learn's 8x8 digits.

* :class:`ResidualMLPDenoiser`: a ~1M-parameter eps-prediction network on the 64
  pixels, class-conditional with a null label (so it is also unconditional and
  supports classifier-free guidance).
* :class:`MLPClassifier` (the target reward) and :class:`CNNClassifier` (the
  cross-reward), different architectures trained on disjoint halves of the train split.
* :class:`DigitsDiffusion`: the denoiser behind the Gaussian-kernel interface.

Weights ship in ``tsf/models/weights`` as safetensors and load by name; the recipe
that made them is ``tsf pretrain digits`` (:mod:`tsf.commands.pretrain_recipes`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn import functional as F

from tsf.errors import ConfigError
from tsf.models.diffusion import EpsDiffusionModel
from tsf.models.flow import FlowModel
from tsf.models.masked import MaskedDiffusion

WEIGHTS_DIR = Path(__file__).parent / "weights"
NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)

#: the diffusers scheduler the denoiser was trained with (shared by training and sampling)
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "timestep_spacing": "leading",  # "trailing" starts at t=999 where abar ~ 2e-9: x0_hat explodes
    "prediction_type": "epsilon",
}


# ----------------------------------------------------------------------------- data
@dataclass
class DigitsSplits:
    """Pixels in [0, 1] as ``[N, 1, 8, 8]`` float tensors, labels as long tensors."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    half_a: Tensor  # indices into train
    half_b: Tensor


def load_digits_splits(seed: int = 0, test_fraction: float = 0.3) -> DigitsSplits:
    """sklearn's digits, a stratified train/test split, and the train split in two disjoint halves."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=data.target)
    a, b = train_test_split(np.arange(len(tr)), test_size=0.5, random_state=seed, stratify=data.target[tr])
    return DigitsSplits(x[tr], y[tr], x[te], y[te], torch.as_tensor(np.sort(a)), torch.as_tensor(np.sort(b)))


# ----------------------------------------------------------------------------- networks
class ResidualMLPDenoiser(nn.Module):
    """eps_theta(x_t, t, class): pre-norm residual MLP blocks with additive (t, class) embeddings.

    With ``out_dim`` set it is a regression head ``[N, out_dim]`` on the same trunk (the
    SVDD-MC value network); otherwise the output has the input's shape.
    """

    def __init__(self, dim: int = 64, width: int = 256, depth: int = 3, hidden: int = 512,
                 num_classes: int = NUM_CLASSES, out_dim: Optional[int] = None) -> None:
        super().__init__()
        self.config = dict(dim=dim, width=width, depth=depth, hidden=hidden, num_classes=num_classes)
        if out_dim is not None:
            self.config["out_dim"] = out_dim
        self.out_dim = out_dim
        self.time_proj = Timesteps(128, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(128, width)
        self.class_embed = nn.Embedding(num_classes + 1, width)  # last index: null label
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(norm=nn.LayerNorm(width), emb=nn.Linear(width, width),
                               fc1=nn.Linear(width, hidden), fc2=nn.Linear(hidden, width)))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, out_dim or dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        shape = x.shape
        emb = F.silu(self.time_embed(self.time_proj(t).to(x.dtype)) + self.class_embed(labels))
        h = self.inp(x.flatten(1))
        for blk in self.blocks:
            y = blk["norm"](h) + blk["emb"](emb)
            h = h + blk["fc2"](F.silu(blk["fc1"](y)))
        out = self.out(h)
        return out if self.out_dim is not None else out.reshape(shape)


class MLPClassifier(nn.Module):
    """The target classifier: an MLP on the 64 pixels."""

    def __init__(self, hidden: int = 256, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.config = dict(hidden=hidden, num_classes=num_classes)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.SiLU(), nn.Dropout(0.2),
                                  nn.Linear(hidden, hidden), nn.SiLU())
        self.head = nn.Linear(hidden, num_classes)
        self.num_features = hidden

    def features(self, images: Tensor) -> Tensor:
        return self.body(images * 2 - 1)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


class CNNClassifier(nn.Module):
    """The cross (holdout) classifier: a small convolutional network; a different architecture."""

    def __init__(self, channels: int = 32, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        c = channels
        self.config = dict(channels=channels, num_classes=num_classes)
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.GroupNorm(8, 2 * c), nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.GroupNorm(8, 2 * c), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * c, num_classes))
        self.num_features = 2 * c

    def features(self, images: Tensor) -> Tensor:
        return self.body(images * 2 - 1)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


ARCHITECTURES = {"ResidualMLPDenoiser": ResidualMLPDenoiser, "MLPClassifier": MLPClassifier,
                 "CNNClassifier": CNNClassifier}

#: shipped weight files by name
CLASSIFIERS = {"target": "digits_classifier_mlp", "holdout": "digits_classifier_cnn"}
DENOISER = "digits_denoiser"
FLOW = "digits_flow"
MASKED = "digits_masked"
#: the digits' native pixel levels (0 .. 16); the masked model's mask token is LEVELS
LEVELS = 17
#: the flow network sees 1000 t (t in [0, 1]), the scale of the diffusion timesteps
FLOW_TIME_SCALE = 1000.0


# ----------------------------------------------------------------------------- weights
def resolve_weights(name_or_path: Union[str, Path]) -> Path:
    """A shipped weight name (``digits_denoiser``) or a path to a ``.safetensors`` file."""
    p = Path(name_or_path)
    if p.suffix != ".safetensors":
        p = WEIGHTS_DIR / f"{name_or_path}.safetensors"
    if not p.is_file():
        shipped = sorted(q.stem for q in WEIGHTS_DIR.glob("*.safetensors"))
        raise ConfigError(
            f"weights {str(name_or_path)!r} not found (looked at {p}); shipped: {shipped}. "
            "Re-create them with `tsf pretrain digits`."
        )
    return p


def save_network(net: nn.Module, path: Path, metadata: Optional[dict] = None) -> None:
    """Save a network as fp16 safetensors with its architecture in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    meta = {"architecture": type(net).__name__, "config": json.dumps(net.config)}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def read_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: (v if k == "architecture" else json.loads(v)) for k, v in meta.items()}


def build_network(name_or_path: Union[str, Path]) -> nn.Module:
    """Construct the architecture recorded in a weight file, without loading its weights."""
    meta = read_metadata(resolve_weights(name_or_path))
    return ARCHITECTURES[meta["architecture"]](**meta["config"])


def load_network(name_or_path: Union[str, Path], net: Optional[nn.Module] = None) -> nn.Module:
    """Load a shipped or saved network (fp32, eval mode)."""
    path = resolve_weights(name_or_path)
    net = build_network(path) if net is None else net
    state = load_file(str(path))
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.float().eval().requires_grad_(False)


# ----------------------------------------------------------------------------- base model
def check_adapter(adapter: Optional[str]) -> None:
    """Refuse an ``adapter`` that is not a peft LoRA adapter directory (reads only its file names)."""
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"adapter {adapter!r} is not a LoRA adapter directory (no adapter_config.json); "
                          "tsf finetune writes one to <run directory>/adapter")


def with_adapter(net: nn.Module, adapter: Optional[str]) -> nn.Module:
    """``net`` with the peft LoRA adapter ``adapter`` (a ``PeftModel``, eval mode), or ``net`` itself for ``None``."""
    if adapter is None:
        return net
    from peft import PeftModel

    return PeftModel.from_pretrained(net, adapter).eval()


#: the prefix of a digits adapter's ``base_model_name_or_path`` (peft's ``adapter_config.json``)
ADAPTER_BASE_PREFIX = "tsf:"


def adapter_base_name(model: nn.Module) -> str:
    """What a digits adapter's ``adapter_config.json`` names as its base model: ``tsf:digits_denoiser`` /
    ``tsf:digits_flow`` for the shipped networks, ``tsf:<model class>:<weights>`` for others
    (:func:`base_network` builds the network back from it)."""
    default = {"DigitsDiffusion": DENOISER, "DigitsFlow": FLOW}[type(model).__name__]
    if model.weights == default:
        return ADAPTER_BASE_PREFIX + default
    return f"{ADAPTER_BASE_PREFIX}{type(model).__name__}:{model.weights}"


def base_network(name: str) -> nn.Module:
    """The frozen network a digits adapter was trained on, from its ``base_model_name_or_path`` (see
    :func:`adapter_base_name`), for ``peft.PeftModel.from_pretrained(base_network(name), adapter_dir)``:
    the diffusion model's eps network ``(x, t, labels) -> eps``, the flow's velocity network ``(x, t in [0, 1],
    labels) -> u`` (its time-scaling wrapper, as the adapter's module names say). Labels: the class, or 10 for
    the unconditional model."""
    if not name.startswith(ADAPTER_BASE_PREFIX):
        raise ConfigError(f"{name!r} does not name a tsf digits model (tsf:digits_denoiser, tsf:digits_flow or "
                          "tsf:<DigitsDiffusion|DigitsFlow>:<weights>)")
    rest = name[len(ADAPTER_BASE_PREFIX):]
    shipped = {DENOISER: "DigitsDiffusion", FLOW: "DigitsFlow"}
    cls, _, weights = (shipped[rest], "", rest) if rest in shipped else rest.partition(":")
    classes = {"DigitsDiffusion": DigitsDiffusion, "DigitsFlow": DigitsFlow}
    if cls not in classes or not weights:
        raise ConfigError(f"{name!r} does not name a tsf digits model (tsf:digits_denoiser, tsf:digits_flow or "
                          "tsf:<DigitsDiffusion|DigitsFlow>:<weights>)")
    return classes[cls](weights=weights).load().net


class DigitsDiffusion(EpsDiffusionModel):
    """The embedded digits diffusion model (8x8 pixels in [-1, 1]; images in [0, 1]).

    Args:
        weights: shipped name or path of a ``.safetensors`` file from ``tsf pretrain digits``.
        scheduler: ``ddim`` or ``ddpm``.
        num_steps: sampling steps T.
        eta: DDIM eta (1 = DDPM-like stochastic kernel, 0 = deterministic).
        guidance_scale: classifier-free guidance weight for class conditions.
        conditional: condition the denoiser on the sample's class (``False``: the null label, i.e.
            the unconditional model, whatever the data module's conditions are).
        batch_invariant: pad calls on fewer than 16 rows (default on: cheap here, and what makes a sample
            bitwise independent of its batch and of the number of processes).
    """

    def __init__(
        self,
        weights: str = DENOISER,
        scheduler: Literal["ddim", "ddpm"] = "ddim",
        num_steps: int = 50,
        eta: float = 1.0,
        guidance_scale: float = 1.0,
        conditional: bool = False,
        adapter: Optional[str] = None,
        batch_invariant: bool = True,
    ) -> None:
        check_adapter(adapter)
        if guidance_scale != 1.0 and not conditional:
            raise ConfigError(f"guidance_scale {guidance_scale} guides towards each sample's class, but this model is "
                              "unconditional (conditional: false): set conditional: true, or leave guidance_scale at 1")
        self.weights, self.adapter = weights, adapter
        net = build_network(weights)  # reads only the header: architecture, no weights
        super().__init__(net, SCHEDULER_CONFIG, scheduler=scheduler, num_steps=num_steps, eta=eta,
                         guidance_scale=guidance_scale, num_classes=NUM_CLASSES, sample_shape=IMAGE_SHAPE,
                         batch_invariant=batch_invariant)
        self.conditional = conditional

    def _load(self) -> None:
        load_network(self.weights, self.net)
        self.net = with_adapter(self.net, self.adapter)
        self.net.to(self.device)

    def encode_conditions(self, conditions):
        if not self.conditional:
            conditions = [None] * len(conditions)
        return super().encode_conditions(conditions)

    def extra_repr(self) -> str:
        return (f"weights={self.weights}, adapter={self.adapter}, conditional={self.conditional}, "
                + super().extra_repr())


class _ScaledTime(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        return self.net(x, t * FLOW_TIME_SCALE, labels)


class DigitsFlow(FlowModel):
    """The embedded digits flow model: a velocity network on the linear path (8x8 pixels in [-1, 1]).

    Args:
        weights: shipped name or path of a ``.safetensors`` file from ``tsf pretrain digits_flow``.
        num_steps, interpolant, diffusion, diffusion_norm, time_grid, last_step: see
            :class:`~tsf.models.flow.FlowModel`.
        conditional: condition on the sample's class (``False``: the unconditional model).
        adapter: a LoRA adapter directory (peft's format: what ``tsf finetune`` writes to ``<run>/adapter`` for a
            DigitsFlow baseline), applied to the velocity network; every sampler then samples the fine-tuned model.
        batch_invariant: pad calls on fewer than 16 rows (default on: cheap here, and what makes a sample
            bitwise independent of its batch and of the number of processes).
    """

    def __init__(self, weights: str = FLOW, num_steps: int = 10, interpolant: Literal["linear", "vp"] = "linear",
                 diffusion: Literal["square", "linear", "constant", "none"] = "square", diffusion_norm: float = 3.0,
                 time_grid: Optional[Literal["uniform", "reference"]] = None, conditional: bool = False,
                 batch_invariant: bool = True, last_step: Optional[Literal["tweedie", "euler"]] = None,
                 adapter: Optional[str] = None) -> None:
        check_adapter(adapter)
        self.weights, self.adapter = weights, adapter
        super().__init__(_ScaledTime(build_network(weights)), num_steps=num_steps, interpolant=interpolant,
                         diffusion=diffusion, diffusion_norm=diffusion_norm, time_grid=time_grid,
                         num_classes=NUM_CLASSES, sample_shape=IMAGE_SHAPE, batch_invariant=batch_invariant,
                         last_step=last_step)
        self.conditional = conditional

    def _load(self) -> None:
        load_network(self.weights, self.net.net)
        self.net = with_adapter(self.net, self.adapter)  # (on the time-scaling wrapper, as add_lora puts it)
        self.net.to(self.device)

    def encode_conditions(self, conditions):
        return super().encode_conditions(conditions if self.conditional else [None] * len(conditions))

    def extra_repr(self) -> str:
        adapter = f"adapter={self.adapter}, " if self.adapter is not None else ""  # (the repr without one unchanged)
        return f"weights={self.weights}, {adapter}conditional={self.conditional}, " + super().extra_repr()


def one_hot_tokens(x: Tensor) -> Tensor:
    """Pixel tokens ``[N, 64]`` (levels 0 .. 16 and the mask 17) as the masked denoiser's input ``[N, 64 * 18]``."""
    return F.one_hot(x.long(), LEVELS + 1).flatten(1).float()


class DigitsMasked(MaskedDiffusion):
    """The embedded masked (discrete) digits model: the 64 pixels at their 17 native levels, one mask token.

    The denoiser is the residual MLP of the other digits models on one-hot tokens, predicting x0 logits per pixel
    (time and class embedded as for the diffusion denoiser; 10% null labels in training, so it is unconditional
    too and takes classifier-free guidance). Images are ``level / 16``, so every digits reward and the evaluator
    apply unchanged.

    Args:
        weights: shipped name or path of a ``.safetensors`` file from ``tsf pretrain digits_masked``.
        num_steps, schedule: see :class:`~tsf.models.masked.MaskedDiffusion`.
        guidance_scale: classifier-free guidance weight for class conditions.
        conditional: condition the denoiser on the sample's class.
        batch_invariant: pad calls on fewer than 16 rows (default on).
    """

    has_images = True

    def __init__(self, weights: str = MASKED, num_steps: int = 32, schedule: Literal["linear", "cosine"] = "linear",
                 guidance_scale: float = 1.0, conditional: bool = False, batch_invariant: bool = True) -> None:
        if guidance_scale != 1.0 and not conditional:
            raise ConfigError(f"guidance_scale {guidance_scale} guides towards each sample's class, but this model is "
                              "unconditional (conditional: false): set conditional: true, or leave guidance_scale at 1")
        super().__init__(seq_len=64, vocab_size=LEVELS + 1, mask_id=LEVELS, num_steps=num_steps, schedule=schedule,
                         guidance_scale=guidance_scale, num_classes=NUM_CLASSES, batch_invariant=batch_invariant)
        self.weights, self.conditional = weights, conditional
        self.net = build_network(weights)

    def _load(self) -> None:
        load_network(self.weights, self.net)
        self.net.to(self.device)

    def encode_conditions(self, conditions):
        return super().encode_conditions(conditions if self.conditional else [None] * len(conditions))

    def logits(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return self.net(one_hot_tokens(x), t * FLOW_TIME_SCALE, c).view(x.shape[0], 64, LEVELS)

    def decode(self, x0: Tensor) -> Tensor:
        return (x0.float() / (LEVELS - 1)).view(-1, *IMAGE_SHAPE)

    def extra_repr(self) -> str:
        return f"weights={self.weights}, conditional={self.conditional}, " + super().extra_repr()
