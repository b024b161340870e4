"""Rewards a researcher might write, right and wrong, for the reward checks (tests/test_rewards.py)."""

import torch

from tsf.rewards import Reward


class _Mean(Reward):
    name = "user"

    def score(self, images):
        return images.float().flatten(1).mean(1)


class Scalar(_Mean):
    def forward(self, images, conditions=None):
        return self.score(images).mean()


class Wide(_Mean):
    def forward(self, images, conditions=None):
        return self.score(images)[:, None].expand(-1, 8)


class Column(_Mean):
    def forward(self, images, conditions=None):
        return self.score(images)[:, None]


class Detached(_Mean):
    differentiable = True

    def forward(self, images, conditions=None):
        return torch.as_tensor(self.score(images).detach().numpy())


class NotMarked(_Mean):
    def forward(self, images, conditions=None):
        return self.score(images)


class SometimesNaN(_Mean):
    """NaN for the images whose mean brightness is below the median of a large batch (about half)."""

    def forward(self, images, conditions=None):
        s = self.score(images)
        return torch.where(s > s.median(), s, torch.full_like(s, float("nan"))) if len(s) > 4 else s


class BFloat16Head(Reward):
    """A bfloat16 linear head fed the float32 images as they come: a dtype mismatch inside forward."""

    name = "user"

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(64, 1).to(torch.bfloat16)

    def forward(self, images, conditions=None):
        return self.head(images.flatten(1))[:, 0].float()


class OnCuda(_Mean):
    """Moves its output to CUDA on a CPU run: a device error inside forward."""

    def forward(self, images, conditions=None):
        return self.score(images).to("cuda")


class Half(_Mean):
    """A float16 output: accepted, cast to float32, and said once."""

    def forward(self, images, conditions=None):
        return self.score(images).half()
