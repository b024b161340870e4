"""Human-preference rewards from their own packages: ``hpsv2`` (HPS v2/v2.1) and ``image_reward`` (ImageReward).

Both packages are optional (``pip install -e ".[rewards]"``) and are imported only in
:meth:`~tsf.loading.LazyLoadModule.load`; a missing package or weight file is a
:class:`~tsf.errors.ConfigError` that names what to install or download and the config
field to point at it. Both are differentiable through the same tensor preprocessing as
the CLIP rewards (:func:`tsf.rewards.clip.preprocess`), for guidance and evaluation alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from tsf.errors import ConfigError
from tsf.loading import resolve_dtype
from tsf.rewards.base import REWARDS, Reward
from tsf.rewards.clip import ImageSpec, check_prompts, preprocess


def _checkpoint_path(path: str, what: str, hint: str) -> str:
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise ConfigError(f"{what}: checkpoint {str(p)!r} not found: {hint}")
    return str(p)


class _TextImageReward(Reward):
    differentiable = True
    spec = ImageSpec(size=224, crop=(224, 224), mode="bicubic")  # both use CLIP's 224 bicubic + mean/std

    def __init__(self, dtype: str = "float32", name: Optional[str] = None) -> None:
        super().__init__()
        self.dtype = resolve_dtype(dtype)
        if name:
            self.name = name
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def check_conditions(self, conditions: Sequence[Any]) -> None:
        check_prompts(self.name, conditions)

    def pixel_values(self, images: Tensor) -> Tensor:
        """The one preprocessing, with or without gradients."""
        self.load()
        return preprocess(images, self.spec).to(next(self.model.parameters()).dtype)


@REWARDS.register("hpsv2")
class HPSv2(_TextImageReward):
    """Human Preference Score v2 (Wu et al. 2023): ``cos(image, prompt)`` under the HPS-tuned
    OpenCLIP ViT-H-14 (typical values ~0.25-0.30).

    Args:
        checkpoint: local path to ``HPS_v2.1_compressed.pt`` / ``HPS_v2_compressed.pt``; ``None``
            fetches ``version``'s file from the hub repo ``xswu/HPSv2`` (or the HF cache).
        version: ``v2.1`` or ``v2.0`` (only used when ``checkpoint`` is ``None``).
    Needs ``open_clip_torch`` or the ``hpsv2`` package (which bundles open_clip).
    """

    name = "hpsv2"
    files = {"v2.1": "HPS_v2.1_compressed.pt", "v2.0": "HPS_v2_compressed.pt"}

    def __init__(self, checkpoint: Optional[str] = None, version: str = "v2.1", dtype: str = "float32",
                 name: Optional[str] = None) -> None:
        super().__init__(dtype, name)
        if version not in self.files:
            raise ConfigError(f"hpsv2 version must be one of {', '.join(self.files)}, got {version!r}")
        self.checkpoint, self.version = checkpoint, version
        self.model = None

    def _hint(self) -> str:
        f = self.files[self.version]
        return (f"download it (`huggingface-cli download xswu/HPSv2 {f} --local-dir DIR`) and set the reward's "
                f"`init_args.checkpoint: DIR/{f}`")

    def _load(self) -> None:
        what = f"reward {self.name!r}"
        path = _checkpoint_path(self.checkpoint, what, self._hint()) if self.checkpoint else None
        try:
            import open_clip
        except ImportError:
            try:
                from hpsv2.src import open_clip  # the hpsv2 package bundles its own open_clip
            except ImportError as e:
                raise ConfigError(f"{what} needs open_clip: `pip install hpsv2` (or `pip install open_clip_torch`), "
                                  "or `pip install -e '.[rewards]'`") from e
        if path is None:
            try:
                from huggingface_hub import hf_hub_download

                path = hf_hub_download("xswu/HPSv2", self.files[self.version])
            except Exception as e:
                raise ConfigError(f"{what}: could not fetch {self.files[self.version]} from xswu/HPSv2 "
                                  f"({type(e).__name__}): {self._hint()}") from e
        model = open_clip.create_model("ViT-H-14", pretrained=None)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # never unpickle arbitrary objects: ask for a tensors-only copy instead
            raise ConfigError(f"{what}: {path} holds more than tensors and tsf loads weights only "
                              "(weights_only=True). In a trusted session, load it once without weights_only, save its "
                              "'state_dict' entry alone with torch.save, and point `checkpoint` at that copy.") from e
        model.load_state_dict(state.get("state_dict", state))
        self.model = model.to(device=self._anchor.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer("ViT-H-14")

    def features(self, images: Tensor) -> Tensor:
        return F.normalize(self.model.encode_image(self.pixel_values(images)).float(), dim=-1)

    def forward(self, images: Tensor, conditions: Optional[Sequence[Any]] = None) -> Tensor:
        conditions = list(conditions) if conditions is not None else [None] * len(images)
        self.check_conditions(conditions)
        image = self.features(images)
        with torch.no_grad():
            text = self.model.encode_text(self.tokenizer(conditions).to(self._anchor.device))
        return (image * F.normalize(text.float(), dim=-1)).sum(-1)


@REWARDS.register("image_reward")
class ImageRewardScore(_TextImageReward):
    """ImageReward (Xu et al. 2023): the BLIP-based reward model, standardised scores (mean 0, std 1
    over its training set), through the package's differentiable ``score_gard``.

    Args:
        checkpoint: local path to ``ImageReward.pt``; ``None`` uses the package's
            ``ImageReward-v1.0`` (fetched from the hub repo ``THUDM/ImageReward`` into ``download_root``).
        med_config: local path to ``med_config.json`` of the same repo (``None``: fetched).
        download_root: where the package keeps fetched files (``None``: ``~/.cache/ImageReward``).
    Needs ``pip install image-reward``; BLIP's tokenizer ``bert-base-uncased`` must be in the HF cache.
    """

    name = "image_reward"

    def __init__(self, checkpoint: Optional[str] = None, med_config: Optional[str] = None,
                 download_root: Optional[str] = None, dtype: str = "float32", name: Optional[str] = None) -> None:
        super().__init__(dtype, name)
        self.checkpoint, self.med_config, self.download_root = checkpoint, med_config, download_root
        self.model = None

    def _load(self) -> None:
        what = f"reward {self.name!r}"
        hint = ("download ImageReward.pt and med_config.json (`huggingface-cli download THUDM/ImageReward "
                "ImageReward.pt med_config.json --local-dir DIR`) and set the reward's `init_args.checkpoint: "
                "DIR/ImageReward.pt` and `init_args.med_config: DIR/med_config.json`")
        ckpt = _checkpoint_path(self.checkpoint, what, hint) if self.checkpoint else "ImageReward-v1.0"
        med = _checkpoint_path(self.med_config, what, hint) if self.med_config else None
        try:
            import ImageReward as RM
        except ImportError as e:
            raise ConfigError(f"{what} needs the ImageReward package: `pip install image-reward` "
                              "(or `pip install -e '.[rewards]'`)") from e
        try:
            model = RM.load(ckpt, device="cpu", download_root=self.download_root, med_config=med)
        except Exception as e:
            raise ConfigError(f"{what}: could not load ImageReward ({type(e).__name__}: {e}); without network, "
                              f"{hint}, and have `bert-base-uncased` in the Hugging Face cache") from e
        self.model = model.to(device=self._anchor.device, dtype=self.dtype).eval().requires_grad_(False)
        self.model.device = self._anchor.device

    def _apply(self, fn, *args, **kwargs):  # ImageReward keeps its device as an attribute
        out = super()._apply(fn, *args, **kwargs)
        if self.model is not None:
            self.model.device = self._anchor.device
        return out

    def features(self, images: Tensor) -> Tensor:
        return F.normalize(self.model.blip.visual_encoder(self.pixel_values(images))[:, 0].float(), dim=-1)

    def forward(self, images: Tensor, conditions: Optional[Sequence[Any]] = None) -> Tensor:
        conditions = list(conditions) if conditions is not None else [None] * len(images)
        self.check_conditions(conditions)
        pixels = self.pixel_values(images)
        tok = self.model.blip.tokenizer(conditions, padding="max_length", truncation=True, max_length=35,
                                        return_tensors="pt").to(self._anchor.device)
        return self.model.score_gard(tok.input_ids, tok.attention_mask, pixels).reshape(-1).float()
