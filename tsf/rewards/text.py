"""Rewards of text: a masked language model's token ids decoded by a tokenizer, then scored as strings.

``TextReward.score(texts, conditions) -> [N]`` is what a subclass writes; the reward decodes the ids it is given
(``decode`` of a :class:`~tsf.models.MaskedLM`) with its own ``tokenizer`` or, when none is named, the base
model's (set by the sampling module). Two examples: a rule (:class:`KeywordReward`) and a ``transformers``
sequence classifier (:class:`TextClassifierReward`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from tsf.errors import ConfigError
from tsf.rewards.base import Reward


class TextReward(Reward):
    """Base class of rewards on text.

    Args:
        tokenizer: hub name or directory of the tokenizer that decodes the ids (default: the base model's).
        skip_prefix: tokens at the start of every sequence not scored (default: the base model's prefix).
    """

    name = "text"

    def __init__(self, tokenizer: Optional[str] = None, skip_prefix: Optional[int] = None) -> None:
        super().__init__()
        self.tokenizer_name, self.skip_prefix = tokenizer, skip_prefix
        self.tokenizer = None

    def bind(self, model: Any) -> None:
        """Take the tokenizer (and the prefix length) of the base model where none was given."""
        if self.tokenizer is None and self.tokenizer_name is None and hasattr(model, "tokenizer"):
            self.tokenizer = model.tokenizer
        if self.skip_prefix is None:
            self.skip_prefix = len(getattr(model, "prefix_ids", ()))

    def _load(self) -> None:
        if self.tokenizer is None and self.tokenizer_name is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)

    def texts(self, ids: Tensor) -> list[str]:
        if self.tokenizer is None:
            self._load()
        if self.tokenizer is None:
            raise ConfigError(f"reward {self.name!r} decodes token ids to text and has no tokenizer: give "
                              "tokenizer: (a hub name or directory), or sample a tsf.models.MaskedLM")
        if ids.is_floating_point():
            raise ConfigError(f"reward {self.name!r} scores token ids, got {ids.dtype} (images?)")
        return self.tokenizer.batch_decode(ids[:, self.skip_prefix or 0:].tolist(), skip_special_tokens=True)

    def score(self, texts: list[str], conditions: Optional[Sequence[Any]]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, ids: Tensor, conditions=None) -> Tensor:
        return self.score(self.texts(ids), conditions).to(ids.device).float()


class KeywordReward(TextReward):
    """The number of occurrences of ``words`` in the text (whole words, case-insensitive), a rule-based reward.

    Args:
        words: the words counted.
    """

    name = "keywords"

    def __init__(self, words: list[str], tokenizer: Optional[str] = None, skip_prefix: Optional[int] = None) -> None:
        super().__init__(tokenizer, skip_prefix)
        if not words:
            raise ConfigError("KeywordReward needs at least one word")
        self.words = [w.lower() for w in words]

    def score(self, texts, conditions):
        return torch.tensor([float(sum(t.lower().split().count(w) for w in self.words)) for t in texts])


class TextClassifierReward(TextReward):
    """``log p(label | text)`` under a ``transformers`` sequence classifier (e.g. a sentiment model).

    Args:
        pretrained: hub name or directory of an ``AutoModelForSequenceClassification`` checkpoint.
        label: the class rewarded, by index or by its name in the model's ``id2label``.
        local_files_only: passed to ``from_pretrained``.
    """

    name = "text_classifier"

    def __init__(self, pretrained: str, label: Any = 1, tokenizer: Optional[str] = None,
                 skip_prefix: Optional[int] = None, local_files_only: bool = False, max_length: int = 512) -> None:
        super().__init__(tokenizer, skip_prefix)
        self.pretrained, self.label, self.local_files_only = str(pretrained), label, local_files_only
        self.max_length = int(max_length)
        self.classifier = self.classifier_tokenizer = None

    def _load(self) -> None:
        super()._load()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        kw = dict(local_files_only=self.local_files_only)
        self.classifier = AutoModelForSequenceClassification.from_pretrained(self.pretrained, **kw).eval()
        self.classifier_tokenizer = AutoTokenizer.from_pretrained(self.pretrained, **kw)
        labels = {v: int(k) for k, v in self.classifier.config.id2label.items()}
        if isinstance(self.label, str) and not self.label.isdigit():
            if self.label not in labels:
                raise ConfigError(f"label {self.label!r} is not one of the classifier's: {sorted(labels)}")
            self.label = labels[self.label]
        self.label = int(self.label)

    @torch.no_grad()
    def score(self, texts, conditions):
        if self.classifier is None:
            self._load()
        enc = self.classifier_tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                        max_length=self.max_length)
        device = next(self.classifier.parameters()).device
        logits = self.classifier(**{k: v.to(device) for k, v in enc.items()}).logits.float()
        return torch.log_softmax(logits, -1)[:, self.label].cpu()
