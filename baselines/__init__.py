"""Training-based comparators (docs/algorithms.md, section 6): DDPO and DRaFT fine-tune LoRA adapters (peft)
on the base model's denoiser, and are judged by tsf's one evaluator."""

from baselines.common import FinetuneModule, add_lora
from baselines.ddpo import DDPO
from baselines.draft import DRaFT

__all__ = ["FinetuneModule", "add_lora", "DDPO", "DRaFT"]
