"""A callback for the DDP fine-tuning test: every rank saves its own LoRA weights at the end of fit."""

import os

import lightning as L
import torch


class SaveRankAdapters(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        lora = {k: v.detach().cpu().clone() for k, v in pl_module.base.net.state_dict().items() if "lora_" in k}
        torch.save(lora, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))
