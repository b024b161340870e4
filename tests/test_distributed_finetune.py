"""Fine-tuning with 2 CPU processes (Lightning DDP, gloo): the global batch is split between the
ranks, gradients are averaged, and the adapters end identical on both ranks and equal to the
single-process run on the same global batch. Subprocesses, as in test_distributed.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def finetune(tmp_path, method, name, *extra):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "tsf.cli", "finetune", "--config", str(ROOT / f"configs/finetune/{method}.yaml"),
           "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--wandb_mode=disabled",
           "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
           "--trainer.callbacks=[]", f"--output_dir={tmp_path}", f"--run_name={name}",
           "--model.init_args.batch_size=8", "--model.init_args.val_samples=10",
           "--model.init_args.base.init_args.num_steps=4",
           "--trainer.callbacks+=rank_probe.SaveRankAdapters", f"--trainer.callbacks.out_dir={out}/ranks", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.parametrize("method", ["draft", "ddpo"])
def test_two_process_finetuning_matches_one_process(tmp_path, method):
    one = finetune(tmp_path, method, "one")
    two = finetune(tmp_path, method, "two", "--trainer.strategy=ddp", "--trainer.devices=2",
                   "--trainer.accelerator=cpu")
    single = torch.load(one / "ranks/rank0.pt")
    r0, r1 = torch.load(two / "ranks/rank0.pt"), torch.load(two / "ranks/rank1.pt")
    assert single.keys() == r0.keys() == r1.keys() and len(single) > 0
    for k in single:
        assert torch.equal(r0[k], r1[k]), k  # DDP keeps the adapters identical on every rank
    # The same global batch gives the single-process adapters up to the order of float sums. Adam moves a
    # weight by ~lr * g / sqrt(v) (at most lr = 3e-4 a step); where a gradient g is almost zero, summation
    # noise changes that ratio, so a rare weight may differ by a few 1e-6 while the rest agree to ~1e-9.
    diff = torch.cat([(r0[k] - single[k]).abs().flatten() for k in single])
    moved = torch.cat([single[k].abs().flatten() for k in single if "lora_B" in k])  # B starts at zero
    assert moved.mean() > 1e-4  # training did move the adapters
    assert diff.mean() < 1e-8 and diff.max() < 5e-5 and (diff > 1e-6).float().mean() < 1e-3, (
        diff.mean(), diff.max(), (diff > 1e-6).float().mean())
    assert (two / "adapter").is_dir() and (two / "val_metrics.jsonl").exists()  # rank 0 wrote the run's files
