"""DDPO and DRaFT: LoRA adapters train, base weights stay, checkpoints resume the same run."""

import json
import math

import lightning as L
import pytest
import torch

from baselines import DDPO, DRaFT
from tsf.models import DigitsDiffusion
from tsf.samplers import BaseSampler


def draft_lv(*args, **kwargs):
    return DRaFT(*args, lv_samples=2, **kwargs)


def ddpo_ppo(*args, **kwargs):
    """DDPO with 8 optimiser steps per sampled epoch (16 samples, minibatches of 4, 2 passes)."""
    return DDPO(*args, num_batches_per_epoch=2, train_batch_size=4, num_inner_epochs=2, **kwargs)


def fit(cls, root, steps, ckpt_path=None):
    module = cls(DigitsDiffusion(num_steps=5), batch_size=8, val_samples=20, seed=3)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, every_n_train_steps=1)
    trainer = L.Trainer(max_steps=steps, default_root_dir=str(root), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=steps, num_sanity_val_steps=0,
                        callbacks=[ckpt])
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer


def lora_state(module):
    return {k: v.detach().clone() for k, v in module.base.net.named_parameters() if "lora_" in k}


@pytest.mark.parametrize("cls", [DRaFT, draft_lv, DDPO])
def test_finetuning_changes_the_adapter_only_and_logs_finite_metrics(cls, tmp_path):
    base = {k: v.clone() for k, v in DigitsDiffusion().load().net.state_dict().items()}
    module, trainer = fit(cls, tmp_path, 3)
    lora = lora_state(module)
    assert lora and any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at 0
    trained = module.base.net.get_base_model().state_dict()
    for k, v in base.items():
        key = next(n for n in trained if n.replace(".base_layer", "") == k)
        assert torch.equal(trained[key], v), k
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in trainer.callback_metrics.values())
    assert "val/cross/digit_holdout/mean" in trainer.callback_metrics
    # the saved adapter loads under any sampler and changes its samples
    tuned = DigitsDiffusion(num_steps=5, adapter=str(tmp_path / "adapter")).load()
    a = BaseSampler().sample(tuned, None, [1, 2], [0, 1]).x0
    b = BaseSampler().sample(DigitsDiffusion(num_steps=5), None, [1, 2], [0, 1]).x0
    assert not torch.equal(a, b)


def read_metrics(root, name="metrics.jsonl"):
    return [json.loads(line) for line in (root / name).read_text().splitlines()]


@pytest.mark.parametrize("cls", [DRaFT, DDPO, ddpo_ppo])
def test_resuming_from_a_checkpoint_continues_the_same_run(cls, tmp_path):
    # DDPO: 2 steps per epoch, the checkpoint at step 2 falls between epochs; ddpo_ppo: 8 per epoch, it
    # falls inside one (the checkpoint then holds the epoch's trajectories)
    straight, _ = fit(cls, tmp_path / "a", 4)
    first, _ = fit(cls, tmp_path / "b", 2)
    ckpt = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=False)
    if cls is ddpo_ppo:
        assert "ddpo_rollouts" in ckpt
    # the checkpoint holds the adapters and their optimiser state, none of the frozen weights (the base
    # denoiser, the target and cross rewards) that the config loads anyway
    lora_keys = {f"base.net.{k}" for k in lora_state(first)}
    assert lora_keys and set(ckpt["state_dict"]) == lora_keys
    assert len(ckpt["optimizer_states"][0]["state"]) == len(lora_keys)
    frozen = sum(v.numel() * v.element_size() for k, v in first.state_dict().items() if k not in lora_keys)
    lora_bytes = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    assert lora_bytes < frozen / 10  # digits, rank 4: 0.1 MB of adapters against 5.6 MB of frozen weights
    assert (tmp_path / "b" / "ckpt" / "last.ckpt").stat().st_size < frozen / 4
    resumed, _ = fit(cls, tmp_path / "b", 4, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for k, v in lora_state(straight).items():
        torch.testing.assert_close(lora_state(resumed)[k], v, rtol=0, atol=1e-7)
    # the validation curve keeps the first part's point (step 2) and appends the resumed run's (step 4)
    assert [m["step"] for m in read_metrics(tmp_path / "b", "val_metrics.jsonl")] == [2, 4]
    if cls is not DRaFT:  # the resumed run's per-step metrics continue the first part's, once each
        a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
        assert [m["step"] for m in b] == [1, 2, 3, 4]
        for x, y in zip(a, b):
            assert x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-9) for k in x)


def test_a_checkpoint_of_other_adapters_is_refused(tmp_path):
    """Loading is not strict (the frozen weights are not in a checkpoint), yet a checkpoint whose adapters are
    not this module's (other target_modules) is an error, not a run resumed on partly fresh adapters."""
    from tsf.errors import ConfigError

    fit(DRaFT, tmp_path, 1)
    module = DRaFT(DigitsDiffusion(num_steps=5), batch_size=8, val_samples=20, seed=3, target_modules=["fc1", "fc2"])
    trainer = L.Trainer(max_steps=2, default_root_dir=str(tmp_path / "other"), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False)
    with pytest.raises(ConfigError, match="does not have"):  # its adapters on inp and emb
        trainer.fit(module, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


def test_overoptimisation_figure_from_curves_and_points(tmp_path):
    from tsf.commands.overopt import overoptimisation_figure

    point = {"target/mean": -1.0, "cross/digit_holdout/mean": -2.0, "diversity/pairwise": 0.4}
    curve = [{"step": s, "target/mean": -s / 100, "cross/digit_holdout/mean": -1.0, "diversity/pairwise": 0.5}
             for s in (50, 100)]
    overoptimisation_figure({"draft": curve}, {"das_k4": point}, tmp_path / "fig")
    assert (tmp_path / "fig.png").stat().st_size > 0 and (tmp_path / "fig.pdf").is_file()


class GradientsBeforeStep(L.Callback):
    """The trainable parameters' gradients as the optimiser receives them (before its update)."""

    def __init__(self) -> None:
        self.grads: dict = {}

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def test_ddpo_micro_batches_accumulate_to_the_full_batch_gradient(tmp_path):
    grads = []
    for mb in (None, 3):
        module = DDPO(DigitsDiffusion(num_steps=5), batch_size=8, val_samples=20, seed=3, micro_batch=mb)
        probe = GradientsBeforeStep()
        trainer = L.Trainer(max_steps=1, default_root_dir=str(tmp_path / str(mb)), logger=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            enable_checkpointing=False, callbacks=[probe])
        trainer.fit(module)
        grads.append(probe.grads)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    scale = max(float(g.abs().max()) for g in grads[0].values())
    assert scale > 0
    for k, v in grads[0].items():
        # the same sum in another order (3 + 3 + 2 samples against 8); the network calls are padded to the
        # model's 16 rows, so each row's output is bitwise the same in both: measured 1.1e-7 of the largest
        # entry (it was 1.4e-5 with unpadded calls); a wrong accumulation is off by O(1)
        torch.testing.assert_close(grads[1][k], v, rtol=0, atol=1e-6 * scale)


def test_ddpo_takes_several_ppo_steps_per_sampled_epoch_and_the_clip_acts(tmp_path, monkeypatch):
    """An epoch samples 2 batches of 8 and trains 2 passes in minibatches of 4: 16 / 4 * 2 = 8 optimiser
    steps on the same samples, so after the first step the ratio leaves 1 and the clip acts."""
    sampled = []
    real = DDPO.sample_epoch
    monkeypatch.setattr(DDPO, "sample_epoch", lambda self, epoch: sampled.append(epoch) or real(self, epoch))
    module, trainer = fit(ddpo_ppo, tmp_path, 9)  # one epoch and the first step of the next
    assert module.steps_per_epoch == 2 * 8 // 4 * 2 == 8
    assert sampled == [0, 1] and trainer.global_step == 9  # one sampling per epoch, one step per minibatch
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 10))  # one line per optimiser step
    for m in metrics:
        assert {"loss", "clipfrac", "approx_kl", "reward_mean", "reward_std"} <= m.keys()
        assert all(math.isfinite(m[k]) for k in ("loss", "clipfrac", "approx_kl", "reward_mean", "reward_std"))
    assert [(m["epoch"], m["inner_epoch"]) for m in metrics[:8]] == [(0, 0)] * 4 + [(0, 1)] * 4
    first = [m for m in metrics if m["step"] % 8 == 1]  # an epoch's first minibatch: the sampling policy
    assert all(m["clipfrac"] == 0 and m["approx_kl"] == 0 for m in first)
    later = [m for m in metrics if m["step"] % 8 != 1]
    assert all(m["approx_kl"] > 0 for m in later) and max(m["clipfrac"] for m in later) > 0
    # the reward statistics are the epoch's: the same on each of its steps
    assert len({m["reward_mean"] for m in metrics[:8]}) == 1 and metrics[0]["reward_std"] > 0
    for key in ("train/loss", "train/clipfrac", "train/approx_kl", "train/reward_mean", "train/reward_std"):
        assert key in trainer.callback_metrics  # and to the Lightning logger


def test_ddpo_unchanged_policy_reproduces_the_sampled_log_probs(tmp_path):
    """The ratio of an epoch's first minibatch is exactly 1: recomputed on minibatch rows (4, 1 or all
    16 rows per call), the log-probabilities equal the ones stored while sampling (8 rows per call)."""
    from baselines.ddpo import mean_log_prob

    module = ddpo_ppo(DigitsDiffusion(num_steps=5), batch_size=8, val_samples=20, seed=3)
    module.configure_model()
    ro = module.sample_epoch(0)
    assert ro["chain"].shape[:2] == (16, 6) and ro["old_logp"].shape == (16, len(ro["steps"])) == (16, 4)
    for rows in (torch.tensor([3, 11, 0, 7]), torch.tensor([5]), torch.arange(16)):
        c = module.base.encode_conditions(module.conditions_of(ro["ids"][rows].tolist()))
        for j, step in enumerate(ro["steps"]):
            tr = module._transition(ro["chain"][rows, step], step, c)
            logp = mean_log_prob(ro["chain"][rows, step + 1], tr.mean, tr.std)
            assert torch.equal(logp, ro["old_logp"][rows, j]), (rows, step)


def test_ddpo_advantages_use_population_statistics():
    from baselines.ddpo import PerConditionStats

    stats = PerConditionStats(size=3, min_count=2)
    adv = stats.advantages(["a", "a", "b"], torch.tensor([0.0, 2.0, 5.0]))
    # "a" has 2 rewards (>= min_count): mean 1, population std 1; "b" has 1: the call's statistics,
    # mean 7/3 and population std sqrt(114/27) (the sample std, ddof = 1, would be sqrt(114/18))
    expected_b = (5 - 7 / 3) / (math.sqrt(114 / 27) + 1e-6)
    torch.testing.assert_close(adv, torch.tensor([-1 / (1 + 1e-6), 1 / (1 + 1e-6), expected_b]))
    # the buffer keeps the last 3 rewards of "a": [0, 2, 4], mean 2, population std sqrt(8/3)
    adv = stats.advantages(["a"], torch.tensor([4.0]))
    torch.testing.assert_close(adv, torch.tensor([2 / (math.sqrt(8 / 3) + 1e-6)]))
    # a single reward of a single condition has std 0: advantage 0, not a division by zero
    assert PerConditionStats().advantages([None], torch.tensor([3.0])).tolist() == [0.0]
