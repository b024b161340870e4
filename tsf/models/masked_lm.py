"""Hugging Face masked language models as masked-diffusion denoisers (docs/algorithms.md, section 11).

:class:`MaskedLM` loads any ``AutoModelForMaskedLM`` checkpoint (BERT- or RoBERTa-style, and MDLM- or LLaDA-style
ones where ``transformers`` loads them, with ``trust_remote_code``) by hub name or local directory, and reads its
logits over the vocabulary as the x0 distribution of :class:`~tsf.models.masked.MaskedDiffusion`: the mask token
is the tokenizer's, and the special tokens are never drawn. A fixed prefix (a prompt) is unmasked from the start
and carried to the end; ``decode`` gives the token ids and :meth:`MaskedLM.texts` the strings.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from tsf.errors import ConfigError
from tsf.models.masked import MaskedDiffusion


class MaskedLM(MaskedDiffusion):
    """A masked language model as a masked-diffusion base model over ``seq_len`` tokens.

    Args:
        pretrained: hub name or local directory of the checkpoint (model and tokenizer).
        seq_len: tokens generated after the prefix.
        prefix: text whose tokens start every sequence, unmasked (the prompt); ``""`` for none.
        num_steps, schedule: see :class:`~tsf.models.masked.MaskedDiffusion`.
        local_files_only, trust_remote_code: passed to ``from_pretrained``.
        dtype: the model's dtype (``float32``, ``bfloat16``, ``float16``).
    """

    def __init__(self, pretrained: str, seq_len: int = 32, prefix: str = "", num_steps: int = 32,
                 schedule: Literal["linear", "cosine"] = "linear", local_files_only: bool = False,
                 trust_remote_code: bool = False, dtype: str = "float32", batch_invariant: bool = False) -> None:
        from transformers import AutoTokenizer

        self.pretrained, self.prefix = str(pretrained), prefix
        self._from = dict(local_files_only=local_files_only, trust_remote_code=trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.pretrained, **self._from)
        except OSError as e:
            raise ConfigError(f"MaskedLM: cannot load the tokenizer of {self.pretrained!r}: {e}") from None
        if tokenizer.mask_token_id is None:
            raise ConfigError(f"MaskedLM: the tokenizer of {self.pretrained!r} has no mask token")
        ids = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        super().__init__(seq_len=len(ids) + int(seq_len), vocab_size=len(tokenizer), mask_id=tokenizer.mask_token_id,
                         num_steps=num_steps, schedule=schedule, excluded_ids=tokenizer.all_special_ids,
                         batch_invariant=batch_invariant)
        self.tokenizer, self.dtype_name = tokenizer, dtype
        self.register_buffer("prefix_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.net: Optional[torch.nn.Module] = None

    def _load(self) -> None:
        from transformers import AutoModelForMaskedLM

        dtype = getattr(torch, self.dtype_name)
        self.net = AutoModelForMaskedLM.from_pretrained(self.pretrained, dtype=dtype, **self._from)
        self.net.eval().requires_grad_(False).to(self.device)

    def extra_repr(self) -> str:
        return f"pretrained={self.pretrained}, prefix={self.prefix!r}, " + super().extra_repr()

    def logits(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return self.net(input_ids=x).logits[..., : self.vocab_size]

    def prior(self, noise: Tensor) -> Tensor:
        x = super().prior(noise)
        n = len(self.prefix_ids)
        if n:
            x[:, :n] = self.prefix_ids.to(x.device)
        return x

    def texts(self, x0: Tensor) -> list[str]:
        """The generated text of each sequence (after the prefix)."""
        return self.tokenizer.batch_decode(x0[:, len(self.prefix_ids):].tolist(), skip_special_tokens=True)
