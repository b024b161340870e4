"""Image statistics rewards: ``compressibility`` and ``incompressibility`` (DDPO/SVDD), ``brightness``."""

from __future__ import annotations

import io
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from tsf.rewards.base import REWARDS, Reward


@REWARDS.register("compressibility")
class Compressibility(Reward):
    """Minus the JPEG size in kB at ``quality`` (DDPO/SVDD), not differentiable.

    Small images are upsampled (nearest) to at least ``min_size`` pixels a side first,
    so that the file size varies with content rather than with JPEG's fixed overhead.
    """

    name = "compressibility"
    differentiable = False

    def __init__(self, quality: int = 95, min_size: int = 64) -> None:
        super().__init__()
        self.quality, self.min_size = quality, min_size

    def forward(self, images: Tensor, conditions: Optional[Sequence[Any]] = None) -> Tensor:
        x = images.detach().float()
        if min(x.shape[-2:]) < self.min_size:
            scale = -(-self.min_size // min(x.shape[-2:]))
            x = F.interpolate(x, scale_factor=scale, mode="nearest")
        arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for a in arr:
            buf = io.BytesIO()
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return -torch.tensor(np.asarray(sizes), dtype=torch.float32, device=images.device)


@REWARDS.register("incompressibility")
class Incompressibility(Compressibility):
    """The JPEG size in kB at ``quality`` (DDPO's incompressibility): minus :class:`Compressibility`."""

    name = "incompressibility"

    def forward(self, images: Tensor, conditions: Optional[Sequence[Any]] = None) -> Tensor:
        return -super().forward(images, conditions)


@REWARDS.register("brightness")
class Brightness(Reward):
    """Mean pixel intensity in [0, 1]; differentiable."""

    name = "brightness"
    differentiable = True

    def forward(self, images: Tensor, conditions: Optional[Sequence[Any]] = None) -> Tensor:
        return images.flatten(1).mean(1)
