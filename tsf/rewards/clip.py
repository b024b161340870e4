"""CLIP-based text-to-image rewards: ``aesthetic`` (LAION), ``clip_score`` and ``pickscore``.

All three share one tensor preprocessing, :func:`preprocess` (antialiased resize of the
shortest edge, center crop, CLIP mean/std, read from the model's image-processor
config). The reward's ``forward`` calls it whether gradients are on (guidance: DAS,
DPS, DRaFT) or off (the evaluator), so a guided sample and its evaluation see the
same pixels. ``features`` are the normalised CLIP image embeddings, for diversity.

Weights load in :meth:`~tsf.loading.LazyLoadModule.load` from a hub name or a local
directory (``model``, ``processor``); a missing path is a :class:`~tsf.errors.ConfigError`
that says what to download and which ``init_args`` field to point at it.
transformers is imported only there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tsf.errors import ConfigError
from tsf.loading import resolve_dtype
from tsf.rewards.base import REWARDS, Reward

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes, as image-processor configs store them
AESTHETIC_HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                      "sac+logos+ava1-l14-linearMSE.pth")
#: the hub repository and file of the same head, as TRL's DDPO loads it (``hf_hub_download``)
AESTHETIC_HEAD_REPO, AESTHETIC_HEAD_FILE = "trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"


# -- preprocessing (one function for guidance and evaluation) --------------------------------
@dataclass(frozen=True)
class ImageSpec:
    """What a CLIP image processor does, as numbers: resize, crop, normalise.

    ``size`` is the target of the shortest edge (an ``int``) or an exact ``(height, width)``;
    ``crop`` the center crop ``(height, width)`` or ``None``; ``mode`` the interpolation.
    """

    size: Any = 224
    crop: Optional[tuple[int, int]] = (224, 224)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    mode: str = "bicubic"

    @classmethod
    def from_processor_config(cls, cfg: dict, mode: Optional[str] = None) -> "ImageSpec":
        """From a ``preprocessor_config.json`` dict (transformers' CLIPImageProcessor fields)."""
        size = cfg.get("size", 224) if cfg.get("do_resize", True) else None
        if isinstance(size, dict):
            size = size["shortest_edge"] if size.get("shortest_edge") else (size["height"], size["width"])
        crop = cfg.get("crop_size") if cfg.get("do_center_crop", True) else None
        if isinstance(crop, dict):
            crop = (crop["height"], crop["width"])
        elif isinstance(crop, int):
            crop = (crop, crop)
        mean, std = (cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD)) if cfg.get(
            "do_normalize", True) else ((0.0,) * 3, (1.0,) * 3)
        mode = mode or _RESAMPLE.get(int(cfg.get("resample", 3)), "bicubic")
        return cls(size=size if not isinstance(size, list) else tuple(size), crop=None if crop is None else tuple(crop),
                   mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), mode=mode)


def resize_shape(height: int, width: int, size: Any) -> tuple[int, int]:
    """The resized ``(h, w)``: the shortest edge to ``size`` keeping the aspect (as transformers does)."""
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(size * long / short)
    return (int(size), new_long) if height <= width else (new_long, int(size))


def preprocess(images: Tensor, spec: ImageSpec) -> Tensor:
    """Images in [0, 1] ``[N, C, H, W]`` to a CLIP model's ``pixel_values``, differentiably.

    Antialiased ``spec.mode`` resize (PIL-like: torch's antialias matches PIL's filter
    support), clamp to [0, 1] as the processor's uint8 round trip does, center crop,
    normalise. Grayscale images are repeated to 3 channels. Computed in float32.
    """
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if spec.size is not None:
        h, w = resize_shape(x.shape[-2], x.shape[-1], spec.size)
        if (h, w) != tuple(x.shape[-2:]):
            aa = spec.mode in ("bilinear", "bicubic")
            x = F.interpolate(x, size=(h, w), mode=spec.mode, antialias=aa,
                              **({"align_corners": False} if aa else {}))
        x = x.clamp(0, 1)
    if spec.crop is not None:
        ch, cw = spec.crop
        h, w = x.shape[-2:]
        if h < ch or w < cw:  # the processor pads; a CLIP input never needs it after the resize
            x = F.pad(x, ((cw - w + 1) // 2 if w < cw else 0, (cw - w) // 2 if w < cw else 0,
                          (ch - h + 1) // 2 if h < ch else 0, (ch - h) // 2 if h < ch else 0))
            h, w = x.shape[-2:]
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[..., top:top + ch, left:left + cw]
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


# -- loading ---------------------------------------------------------------------------------
def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") != 1


def check_source(source: str, field: str, what: str, hub_default: str) -> str:
    """``source`` if it is an existing local path or a hub name; a missing local path is a ConfigError."""
    path = Path(os.path.expanduser(source))
    if path.exists():
        return str(path)
    if _looks_like_path(source):
        raise ConfigError(
            f"{what}: local path {source!r} does not exist. Download it, e.g. `huggingface-cli download "
            f"{hub_default} --local-dir {source}`, or set `{field}` to a hub name such as {hub_default!r} "
            f"(downloaded into the Hugging Face cache on first use)")
    return source


def from_pretrained(cls: Any, source: str, field: str, what: str, hub_default: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(source)`` with a ConfigError that says what to download and where to point."""
    source = check_source(source, field, what, hub_default)
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(
            f"{what}: could not load {source!r} with {cls.__name__} ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"Without network, download it first (`huggingface-cli download {hub_default} --local-dir DIR`) and "
            f"set `{field}: DIR`") from e


def processor_config(source: str, field: str, what: str, hub_default: str) -> dict:
    """The image-processor config dict (``preprocessor_config.json``) of a hub name or directory."""
    from transformers.image_processing_utils import ImageProcessingMixin

    source = check_source(source, field, what, hub_default)
    try:
        cfg, _ = ImageProcessingMixin.get_image_processor_dict(source)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{what}: no image-processor config (preprocessor_config.json) at {source!r} "
            f"({type(e).__name__}). Without network, download it first (`huggingface-cli download {hub_default} "
            f"--local-dir DIR`) and set `{field}: DIR`") from e
    return cfg




# -- rewards ---------------------------------------------------------------------------------
def check_prompts(reward: str, conditions: Sequence[Any]) -> None:
    """A text-image reward's conditions must be prompts; otherwise a ConfigError saying where to set them."""
    bad = [c for c in conditions if not isinstance(c, str)]
    if bad:
        raise ConfigError(f"reward {reward!r} scores images against text prompts; got condition {bad[0]!r} "
                          "(set data.prompts or data.conditions to prompts)")


class ClipReward(Reward):
    """A reward on a transformers ``CLIPModel`` (image tower; text tower when ``uses_text``).

    Args:
        model: hub name or local directory of the CLIP model.
        processor: hub name or local directory of its tokenizer and image-processor config
            (default: ``model``).
        dtype: ``float32``, ``float16`` or ``bfloat16`` for the CLIP weights.
        interpolation: ``bicubic``/``bilinear`` to override the processor's resample.
        name: the reward's name in metrics (default: the registered name).
    """

    differentiable = True
    default_model = "openai/clip-vit-large-patch14"
    default_processor: Optional[str] = None
    uses_text = True

    def __init__(self, model: Optional[str] = None, processor: Optional[str] = None, dtype: str = "float32",
                 interpolation: Optional[str] = None, name: Optional[str] = None) -> None:
        super().__init__()
        self.model_name = model or self.default_model
        self.processor_name = processor or self._default_processor_for(self.model_name)
        self.dtype = resolve_dtype(dtype)
        if interpolation not in (None, "bicubic", "bilinear"):
            raise ConfigError(f"interpolation must be bicubic or bilinear, got {interpolation!r}")
        self.interpolation = interpolation
        if name:
            self.name = name
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # where load() puts the model
        self.clip: Optional[nn.Module] = None
        self.spec: Optional[ImageSpec] = None
        self.tokenizer = None
        self._text_cache: dict[str, Tensor] = {}

    def _default_processor_for(self, model: str) -> str:
        """The model itself, unless the model has its processor elsewhere (PickScore) and is not a
        local directory that holds one."""
        local = Path(os.path.expanduser(model))
        if self.default_processor is None or (local / "preprocessor_config.json").is_file():
            return model
        return self.default_processor

    def _load(self) -> None:
        import transformers

        what = f"reward {self.name!r}"
        cfg = processor_config(self.processor_name, "init_args.processor" if self.processor_name != self.model_name
                               else "init_args.model", what, self.default_processor or self.default_model)
        self.spec = ImageSpec.from_processor_config(cfg, self.interpolation)
        self.clip = from_pretrained(transformers.CLIPModel, self.model_name, "init_args.model", what, self.default_model)
        self.clip = self.clip.to(device=self._anchor.device, dtype=self.dtype).eval().requires_grad_(False)
        if self.uses_text:
            self.tokenizer = from_pretrained(transformers.AutoTokenizer, self.processor_name,
                                             "init_args.processor", what,
                                             self.default_processor or self.default_model)

    def check_conditions(self, conditions: Sequence[Any]) -> None:
        if self.uses_text:
            check_prompts(self.name, conditions)

    # the model's pieces
    def pixel_values(self, images: Tensor) -> Tensor:
        """The one preprocessing, with or without gradients (see :func:`preprocess`)."""
        self.load()
        return preprocess(images, self.spec).to(self.clip.dtype)  # the weights' dtype, even after a .half()

    def image_embeds(self, images: Tensor) -> Tensor:
        """Normalised projected CLIP image embeddings ``[N, d]`` (float32)."""
        self.load()
        m = self.clip
        vision = m.vision_model(pixel_values=self.pixel_values(images)).pooler_output
        return F.normalize(m.visual_projection(vision).float(), dim=-1)

    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """Normalised projected CLIP text embeddings ``[N, d]``, cached per prompt (constants under guidance)."""
        self.load()
        self.check_conditions(prompts)
        device = self._anchor.device
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            tok = self.tokenizer(missing, padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                                 return_tensors="pt").to(device)
            with torch.no_grad():
                out = self.clip.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
                emb = F.normalize(self.clip.text_projection(out.pooler_output).float(), dim=-1)
            self._text_cache.update(zip(missing, emb))
        return torch.stack([self._text_cache[p].to(device) for p in prompts])

    def features(self, images: Tensor) -> Tensor:
        return self.image_embeds(images)

    def _apply(self, fn, *args, **kwargs):  # .to(device) drops the text cache (it lives on the old device)
        self._text_cache = {}
        return super()._apply(fn, *args, **kwargs)


@REWARDS.register("clip_score")
class ClipScore(ClipReward):
    """CLIP score: ``scale * cos(image, prompt)`` (``scale`` 100 as in Hessel et al. 2021).

    Unlike torchmetrics' ``CLIPScore`` the cosine is not clipped at 0, so its gradient never vanishes.
    Default model ``openai/clip-vit-large-patch14`` (torchmetrics' default).
    """

    name = "clip_score"

    def __init__(self, model: Optional[str] = None, processor: Optional[str] = None, scale: float = 100.0,
                 dtype: str = "float32", interpolation: Optional[str] = None, name: Optional[str] = None) -> None:
        super().__init__(model, processor, dtype, interpolation, name)
        self.scale = float(scale)

    def forward(self, images: Tensor, conditions: Optional[Sequence[Any]] = None) -> Tensor:
        text = self.text_embeds(conditions if conditions is not None else [None] * len(images))
        return self.scale * (self.image_embeds(images) * text).sum(-1)


@REWARDS.register("pickscore")
class PickScore(ClipReward):
    """PickScore (Kirstain et al. 2023): ``exp(logit_scale) * cos(image, prompt)`` under the
    CLIP-H model fine-tuned on Pick-a-Pic (``yuvalkirstain/PickScore_v1``), with the processor of
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Typical values ~ 18-23."""

    name = "pickscore"
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def forward(self, images: Tensor, conditions: Optional[Sequence[Any]] = None) -> Tensor:
        text = self.text_embeds(conditions if conditions is not None else [None] * len(images))
        cos = (self.image_embeds(images) * text).sum(-1)
        return self.clip.logit_scale.exp().float() * cos


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP (``layers.0`` ... ``layers.7``, dropout at 1, 3, 5)."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


@REWARDS.register("aesthetic")
class AestheticScore(ClipReward):
    """LAION aesthetic predictor v2 (DDPO, DAS, SVDD): the MLP head on normalised CLIP ViT-L/14
    image embeddings, a score on a 1-10 scale.

    Args:
        head: a local file of the head's weights, which overrides the hub file below:
            ``sac+logos+ava1-l14-linearMSE.pth`` of github.com/christophschuhmann/improved-aesthetic-predictor
            (a ``.pth`` state dict or ``.safetensors`` with keys ``layers.0.weight`` ...).
        head_repo, head_file: where the head comes from when ``head`` is not given: ``hf_hub_download(head_repo,
            head_file)`` (the Hugging Face cache; ``HF_HUB_OFFLINE=1`` reads the cache only). Default: the same
            LAION v2 head as TRL's DDPO ships it, ``trl-lib/ddpo-aesthetic-predictor`` / ``aesthetic-model.pth``.
        model, processor, dtype, interpolation, name: as :class:`ClipReward`.
    """

    name = "aesthetic"
    uses_text = False

    def __init__(self, head: Optional[str] = None, model: Optional[str] = None, processor: Optional[str] = None,
                 dtype: str = "float32", interpolation: Optional[str] = None, name: Optional[str] = None,
                 head_repo: str = AESTHETIC_HEAD_REPO, head_file: str = AESTHETIC_HEAD_FILE) -> None:
        super().__init__(model, processor, dtype, interpolation, name)
        self.head_path = head
        self.head_repo, self.head_file = head_repo, head_file
        self.head: Optional[AestheticHead] = None

    def head_weights(self) -> Path:
        """The head's file: ``head`` when given, else ``hf_hub_download(head_repo, head_file)``."""
        hint = (f"set the reward's `init_args.head` to a local copy of {AESTHETIC_HEAD_URL} (e.g. "
                "--model.init_args.reward.init_args.head=/path/sac+logos+ava1-l14-linearMSE.pth), or download "
                f"`huggingface-cli download {self.head_repo} {self.head_file}` into the Hugging Face cache")
        if self.head_path:
            path = Path(os.path.expanduser(self.head_path))
            if not path.is_file():
                raise ConfigError(f"reward {self.name!r}: aesthetic head weights {str(path)!r} not found: {hint}")
            return path
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(self.head_repo, self.head_file))
        except (OSError, ValueError) as e:  # (the hub's errors, offline or not found, are OSErrors)
            raise ConfigError(f"reward {self.name!r}: cannot get the aesthetic head {self.head_file!r} of "
                              f"{self.head_repo!r} (init_args.head_repo, init_args.head_file) from the hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); {hint}") from e

    def _load(self) -> None:
        path = self.head_weights()
        hint = f"init_args.head takes the LAION aesthetic head {AESTHETIC_HEAD_URL}"
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
        if "layers.0.weight" not in state:
            raise ConfigError(f"reward {self.name!r}: {str(path)!r} is not an aesthetic head state dict "
                              f"(no `layers.0.weight`; keys: {', '.join(list(state)[:5])}): {hint}")
        super()._load()
        dim = state["layers.0.weight"].shape[1]
        proj = self.clip.config.projection_dim
        if dim != proj:
            raise ConfigError(f"reward {self.name!r}: the head takes {dim}-d embeddings but {self.model_name!r} "
                              f"gives {proj}-d (the LAION head needs CLIP ViT-L/14, 768-d)")
        head = AestheticHead(dim)
        head.load_state_dict(state)
        self.head = head.to(self._anchor.device).eval().requires_grad_(False)

    def forward(self, images: Tensor, conditions: Optional[Sequence[Any]] = None) -> Tensor:
        emb = self.image_embeds(images)
        return self.head(emb).squeeze(-1).float()
