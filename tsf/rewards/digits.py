"""Digit rewards from the embedded classifiers: ``digit`` (target) and ``digit_holdout`` (cross),
``digit_confidence`` / ``digit_holdout_confidence`` (the log-probability of the most likely class), and
``digit_log_odds`` / ``digit_holdout_log_odds`` (the log-odds of the asked class: unbounded, the hard task's
target)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor

from tsf.models import digits as D
from tsf.errors import ConfigError
from tsf.rewards.base import REWARDS, Reward


class DigitReward(Reward):
    """``log p(class | image)`` under an embedded digit classifier.

    Args:
        classifier: ``"target"`` (the MLP, trained on half A) or ``"holdout"`` (the CNN, half B),
            or a path to a ``.safetensors`` classifier from ``tsf pretrain digits``.
        digit: the class to reward; ``None`` rewards each sample's own condition (its class).
    """

    differentiable = True

    def __init__(self, classifier: str = "target", digit: Optional[int] = None, name: Optional[str] = None) -> None:
        super().__init__()
        if digit is not None and not 0 <= int(digit) < D.NUM_CLASSES:
            raise ConfigError(f"digit must be a class in 0-{D.NUM_CLASSES - 1}, got {digit}")
        self.classifier = classifier
        self.digit = None if digit is None else int(digit)
        self.name = name or ("digit" if classifier == "target" else f"digit_{classifier}")
        self.net = D.build_network(D.CLASSIFIERS.get(classifier, classifier))

    def _load(self) -> None:
        device = next(self.net.parameters()).device
        D.load_network(D.CLASSIFIERS.get(self.classifier, self.classifier), self.net).to(device)

    def labels(self, n: int, conditions: Optional[Sequence[Any]], device) -> Tensor:
        if self.digit is not None:
            return torch.full((n,), self.digit, dtype=torch.long, device=device)
        if conditions is None or any(c is None for c in conditions):
            raise ConfigError(
                f"reward {self.name!r} has no digit: set `digit:` in its config or give every sample a class "
                "condition (data.conditions)"
            )
        labels = torch.as_tensor([int(c) for c in conditions], dtype=torch.long, device=device)
        if ((labels < 0) | (labels >= D.NUM_CLASSES)).any():
            raise ConfigError(f"digit conditions must be classes in 0-{D.NUM_CLASSES - 1}")
        return labels

    def check_conditions(self, conditions: Sequence[Any]) -> None:
        self.labels(len(conditions), conditions, "cpu")

    def forward(self, images: Tensor, conditions: Optional[Sequence[Any]] = None) -> Tensor:
        logp = self.net(images).log_softmax(-1)
        return logp.gather(1, self.labels(images.shape[0], conditions, images.device)[:, None]).squeeze(1)

    def features(self, images: Tensor) -> Tensor:
        return self.net.features(images)


class DigitConfidence(DigitReward):
    """``max_k log p(k | image)``: how sure a digit classifier is that the image is some digit, whatever
    the class. It needs no condition, so it judges unconditional tasks (is a compressible sample
    still a digit?).

    Args:
        classifier: as for :class:`DigitReward`.
    """

    def __init__(self, classifier: str = "target", name: Optional[str] = None) -> None:
        super().__init__(classifier=classifier, name=name or (
            "digit_confidence" if classifier == "target" else f"digit_{classifier}_confidence"))

    def check_conditions(self, conditions: Sequence[Any]) -> None:
        """Any conditions (the class is not read)."""

    def forward(self, images: Tensor, conditions: Optional[Sequence[Any]] = None) -> Tensor:
        return self.net(images).log_softmax(-1).max(-1).values


class DigitLogOdds(DigitReward):
    """``log p(c | x) - log(1 - p(c | x)) = z_c - logsumexp_{k != c} z_k``: the log-odds of the asked class
    from the classifier's logits ``z``. It rises with ``log p(c | x)`` but does not stop at 0: real test
    digits score 12 +- 6 under the MLP, and pixel-space ascent on the MLP reaches 50 while the CNN's own
    log-odds falls (the blind spots of the hard task: README, "The hard digits task"). Computed from the logits, so it
    stays finite and exact where ``p(c | x)`` rounds to 1 in float32.

    Args: as for :class:`DigitReward`.
    """

    def __init__(self, classifier: str = "target", digit: Optional[int] = None, name: Optional[str] = None) -> None:
        super().__init__(classifier=classifier, digit=digit, name=name or (
            "digit_log_odds" if classifier == "target" else f"digit_{classifier}_log_odds"))

    def forward(self, images: Tensor, conditions: Optional[Sequence[Any]] = None) -> Tensor:
        z = self.net(images)
        c = self.labels(images.shape[0], conditions, images.device)[:, None]
        others = z.scatter(1, c, float("-inf"))
        return z.gather(1, c).squeeze(1) - others.logsumexp(-1)


REWARDS.register("digit", DigitReward, classifier="target")
REWARDS.register("digit_holdout", DigitReward, classifier="holdout")
REWARDS.register("digit_confidence", DigitConfidence, classifier="target")
REWARDS.register("digit_holdout_confidence", DigitConfidence, classifier="holdout")
REWARDS.register("digit_log_odds", DigitLogOdds, classifier="target")
REWARDS.register("digit_holdout_log_odds", DigitLogOdds, classifier="holdout")
