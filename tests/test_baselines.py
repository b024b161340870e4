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


@pytest.mark.parametrize("family", ["diffusion", "flow"])
def test_ddpo_unchanged_policy_reproduces_the_sampled_log_probs(tmp_path, family):
    """The ratio of an epoch's first minibatch is exactly 1: recomputed on minibatch rows (4, 1 or all
    16 rows per call), the log-probabilities equal the ones stored while sampling (8 rows per call). DDIM's
    last step is deterministic (4 stochastic steps of 5); the flow's Linear-SDE has noise on all 5, and its
    log-probability is the kernel's Gaussian density (``model.log_prob``) averaged over the 64 pixels."""
    from baselines.ddpo import mean_log_prob

    model = DigitsDiffusion(num_steps=5) if family == "diffusion" else DigitsFlow(num_steps=5)
    module = ddpo_ppo(model, batch_size=8, val_samples=20, seed=3)
    module.configure_model()
    ro = module.sample_epoch(0)
    stochastic = 4 if family == "diffusion" else 5
    assert ro["chain"].shape[:2] == (16, 6) and ro["old_logp"].shape == (16, len(ro["steps"])) == (16, stochastic)
    if family == "flow":
        c = model.encode_conditions([None] * 16)
        tr = model.transition(ro["chain"][:, 2], 2, c)
        torch.testing.assert_close(ro["old_logp"][:, 2], model.log_prob(ro["chain"][:, 3], tr) / 64,
                                   rtol=1e-5, atol=1e-5)
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


# -- flow models: DDPO / GRPO on the stochastic kernel, DRaFT through the flow sampler ------------------------------
from tsf.models import DigitsFlow  # noqa: E402
from tsf.rewards import DigitReward  # noqa: E402
from tsf.rewards.base import Reward  # noqa: E402


def digit3(**kwargs):
    """The fine-tuning configs' task: the unconditional model, a 3 under the target MLP, the holdout CNN as cross."""
    return dict(reward=DigitReward("target", digit=3), cross_rewards=[DigitReward("holdout", digit=3)],
                conditions=[None], **kwargs)


def grpo_kl(*args, **kwargs):
    return DDPO(*args, advantages="grpo", kl_coef=0.1, **kwargs)


def fit_flow(cls, root, steps, base=None, callbacks=(), validate=True, **kwargs):
    module = cls(base or DigitsFlow(num_steps=4), **{**digit3(batch_size=8, val_samples=20, seed=3), **kwargs})
    trainer = L.Trainer(max_steps=steps, default_root_dir=str(root), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=steps, num_sanity_val_steps=0,
                        limit_val_batches=None if validate else 0, enable_checkpointing=False,
                        callbacks=list(callbacks))
    trainer.fit(module)
    return module, trainer


FLOW_KERNELS = {"linear_sde": {}, "vp_sde": {"interpolant": "vp"}, "ode": {"diffusion": "none"}}
FLOW_METHODS = [(DDPO, "linear_sde"), (grpo_kl, "linear_sde"), (grpo_kl, "vp_sde"), (DRaFT, "linear_sde"),
                (DRaFT, "ode"), (draft_lv, "vp_sde")]


@pytest.mark.parametrize("cls,kernel", FLOW_METHODS, ids=lambda v: getattr(v, "__name__", v))
def test_flow_finetuning_trains_the_adapter_only_and_digits_flow_loads_it(cls, kernel, tmp_path):
    base = {k: v.clone() for k, v in DigitsFlow().load().net.state_dict().items()}
    module, trainer = fit_flow(cls, tmp_path, 3, DigitsFlow(num_steps=4, **FLOW_KERNELS[kernel]))
    lora = lora_state(module)
    assert lora and any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at 0
    trained = module.base.net.get_base_model().state_dict()
    for k, v in base.items():  # the velocity network's weights are the shipped ones
        key = next(n for n in trained if n.replace(".base_layer", "") == k)
        assert torch.equal(trained[key], v), k
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in trainer.callback_metrics.values())
    assert "val/cross/digit_holdout/mean" in trainer.callback_metrics
    if cls is grpo_kl:
        assert trainer.callback_metrics["train/kl"] >= 0
    # the saved adapter loads into DigitsFlow (`adapter:`) with the trained weights, and changes its samples
    tuned = DigitsFlow(num_steps=4, adapter=str(tmp_path / "adapter"), **FLOW_KERNELS[kernel]).load()
    assert "adapter=" in repr(tuned)  # (another cache key than the base model's)
    loaded = {k: v for k, v in tuned.net.named_parameters() if "lora_" in k}
    assert loaded.keys() == lora.keys() and all(torch.equal(loaded[k], v) for k, v in lora.items())
    a = BaseSampler().sample(tuned, None, [None] * 2, [0, 1]).x0
    b = BaseSampler().sample(DigitsFlow(num_steps=4, **FLOW_KERNELS[kernel]), None, [None] * 2, [0, 1]).x0
    assert not torch.equal(a, b)


class ZeroReward(Reward):
    """A reward of 0 for every image (differentiable: its gradient is 0 too)."""

    name = "zero"
    differentiable = True

    def forward(self, images, conditions=None):
        return images.flatten(1).sum(1) * 0.0


@pytest.mark.parametrize("advantages", ["ddpo", "grpo"])
def test_flow_ddpo_with_a_zero_reward_leaves_the_adapter_unchanged(advantages, tmp_path):
    """All rewards 0: every advantage is 0, the KL to the base model is 0 while the adapter is the base model
    (LoRA's B starts at 0), so every gradient is exactly 0 and AdamW (weight decay 0) leaves the adapter as it
    was, over several PPO steps of one epoch and into the next."""
    probe = GradientsBeforeStep()
    steps = []
    kwargs = dict(reward=ZeroReward(), advantages=advantages, kl_coef=0.5, weight_decay=0.0,
                  num_batches_per_epoch=2, train_batch_size=4)
    module = DDPO(DigitsFlow(num_steps=4), **{**digit3(batch_size=8, val_samples=20, seed=3), **kwargs})
    module.configure_model()
    before = lora_state(module)

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            steps.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    trainer = L.Trainer(max_steps=5, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
                        callbacks=[probe, Record()])
    trainer.fit(module)
    assert module.steps_per_epoch == 4 and len(steps) == 5  # a second epoch was sampled
    assert all(len(grads) == len(before) for grads in steps)  # every adapter matrix got a gradient: 0
    assert all(torch.count_nonzero(g) == 0 for grads in steps for g in grads.values())
    after = lora_state(module)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    metrics = read_metrics(tmp_path)
    assert all(m["loss"] == 0 and m["kl"] == 0 and m["reward_std"] == 0 for m in metrics)


def test_grpo_advantages_are_normalised_within_each_group():
    from baselines.ddpo import group_advantages

    groups = [(0, "a"), (0, "a"), (0, "a"), (0, "b"), (0, "b"), (1, "a")]
    adv = group_advantages(groups, torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 7.0]))
    # group (0, a): mean 3, population std sqrt(14/3); (0, b): equal rewards, std 0: advantages 0; (1, a): one
    # reward: 0
    s = math.sqrt(14 / 3) + 1e-6
    torch.testing.assert_close(adv, torch.tensor([-2 / s, -1 / s, 3 / s, 0.0, 0.0, 0.0]))


def test_grpo_groups_are_the_samples_of_one_condition_in_one_sampled_batch():
    """Two classes, two sampled batches of 8 per epoch: four groups of G = 4; each group's advantages have mean
    0 and population std 1 (up to the 1e-6 in the denominator), and they are not DDPO's per-condition ones (the
    unconditional model, rewarded for the sample's class: rewards that vary within a group)."""
    model = DigitsFlow(num_steps=4)
    module = DDPO(model, reward=DigitReward("target"), cross_rewards=[DigitReward("holdout")], conditions=[1, 7],
                  batch_size=8, num_batches_per_epoch=2, advantages="grpo", val_samples=20, seed=3)
    module.configure_model()
    ro = module.sample_epoch(0)
    ids = ro["ids"].tolist()
    groups = module.groups_of(ids)
    assert sorted(set(groups)) == [(0, 1), (0, 7), (1, 1), (1, 7)]
    assert all(groups.count(g) == 4 for g in set(groups))
    adv, r = ro["adv"].double(), ro["rewards"].double()
    assert ro["adv"].abs().max() <= 5  # (within a group of G, |advantage| <= sqrt(G - 1): the clip never acts)
    for g in set(groups):
        rows = [j for j, h in enumerate(groups) if h == g]
        assert r[rows].std() > 1e-3  # distinct rewards
        assert abs(float(adv[rows].mean())) < 1e-6
        assert float(adv[rows].std(correction=0)) == pytest.approx(1.0, abs=1e-5)
    from baselines.ddpo import PerConditionStats

    ddpo = PerConditionStats().advantages(module.conditions_of(ids), ro["rewards"])  # the epoch's per class
    assert not torch.allclose(ddpo, ro["adv"], atol=1e-3)


def test_flow_ddpo_refuses_what_it_cannot_train():
    from tsf.errors import ConfigError

    with pytest.raises(ConfigError, match="diffusion to square, linear or constant"):
        DDPO(DigitsFlow(num_steps=4, diffusion="none"), **digit3())
    with pytest.raises(ConfigError, match="set batch_size to at least 20"):
        DDPO(DigitsFlow(num_steps=4), batch_size=16, advantages="grpo")  # the 10 classes: groups of 1 or 2
    with pytest.raises(ConfigError, match="unknown advantages"):
        DDPO(DigitsFlow(num_steps=4), advantages="ppo", **digit3())
    with pytest.raises(ConfigError, match="kl_coef"):
        DDPO(DigitsFlow(num_steps=4), kl_coef=-1.0, **digit3())


def test_the_kl_penalty_is_the_closed_form_against_the_frozen_base_model(tmp_path):
    """``gaussian_kl`` is torch's KL of the two Gaussians divided by the dimension, and the reference mean comes
    from the base model: with the adapters disabled the trained model's kernel is the shipped model's, bit for bit."""
    from baselines.common import adapters_disabled
    from baselines.ddpo import gaussian_kl

    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    std = torch.full((3, 1, 1, 1), 0.3)
    p = torch.distributions.Normal(mean.flatten(1), std.flatten(1).expand(3, 64))
    q = torch.distributions.Normal(ref.flatten(1), std.flatten(1).expand(3, 64))
    torch.testing.assert_close(gaussian_kl(mean, ref, std), torch.distributions.kl_divergence(p, q).mean(1))

    module, _ = fit_flow(grpo_kl, tmp_path, 2, validate=False, lr=0.01)
    model, fresh = module.base, DigitsFlow(num_steps=4).load()
    x = torch.randn(16, 1, 8, 8, generator=g)
    c = model.encode_conditions([None] * 16)
    with torch.no_grad():
        with adapters_disabled(model):
            off = model.transition(x, 1, c).mean
        on = model.transition(x, 1, c).mean
        assert torch.equal(off, fresh.transition(x, 1, c).mean)
    assert (on - off).abs().max() > 1e-4  # (and the adapters are back on after the context)
    assert read_metrics(tmp_path)[-1]["kl"] > 0  # the moved policy is penalised


# -- DRaFT's gradient through the flow sampler against a finite difference ----------------------------------------
class TinyVelocity(torch.nn.Module):
    """A two-layer velocity network on 4-dimensional states (float64 in the test)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(5, 16), torch.nn.Linear(16, 4)

    def forward(self, x, t, labels):
        h = torch.tanh(self.fc1(torch.cat([x.flatten(1), t[:, None]], 1)))
        return self.fc2(h).view_as(x)


class Quadratic(Reward):
    name, differentiable = "quadratic", True

    def forward(self, images, conditions=None):
        return -((images - 0.7) ** 2).flatten(1).sum(1)


@pytest.mark.parametrize("kernel,K,lv", [("linear_sde", 2, 0), ("vp_sde", 1, 0), ("ode", 4, 0), ("ode", 1, 0),
                                         ("linear_sde", 1, 3)])
def test_flow_draft_gradient_matches_a_finite_difference(kernel, K, lv):
    """DRaFT-K's gradient is the derivative of its loss in the adapter's weights as used by the last K steps (the
    earlier steps run without gradients: the same weights, held fixed); DRaFT-LV's in the weights of its one-step
    denoisings of the re-noised x0. In float64, that derivative by a central difference (h = 1e-6) equals the
    autograd gradient for every LoRA matrix entry tried: the difference's error is O(h^2) (below 1e-12 here)
    plus rounding, about 1e-16 |loss| / h ~ 1e-10 absolute, against gradients of 2e-4 to 7e-2 (measured: at
    most 2.6e-7 relative, the smallest gradients'; rel 1e-5 with abs 1e-8 leaves room for other CPUs' rounding).
    A finite difference that moves the weights of every step instead (the untruncated derivative) is off by
    a factor of 6 to 56 for K < T, so the check tells the truncated gradient from the full one."""
    from tsf.models.flow import FlowModel

    torch.manual_seed(0)
    base = FlowModel(TinyVelocity(), num_steps=4, sample_shape=(1, 2, 2), **FLOW_KERNELS[kernel])
    module = DRaFT(base, reward=Quadratic(), cross_rewards=[], conditions=[None], batch_size=3, truncation=K,
                   lv_samples=lv, target_modules=["fc1", "fc2"], seed=1)
    module.configure_model()
    module.double()
    with torch.no_grad():  # a trained-looking adapter: B away from 0
        for name, p in module.base.net.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, dtype=p.dtype))
    loss = module.training_step(None, 0)
    assert loss.dtype == torch.float64
    loss.backward()
    T = base.num_steps
    first_graded_call = T - K if not lv else T  # the transition calls that carry the gradient
    params = [(n, p) for n, p in module.base.net.named_parameters() if p.requires_grad]
    assert {n.split(".")[-3] for n, _ in params} == {"lora_A", "lora_B"}

    def loss_with(p, idx, h):
        calls = []
        real = base.transition

        def transition(x, i, c, output=None):
            shifted = len(calls) >= first_graded_call
            calls.append(i)
            if shifted:
                p[idx] += h
            try:
                return real(x, i, c, output)
            finally:
                if shifted:
                    p[idx] -= h

        base.transition = transition
        try:
            with torch.no_grad():
                return float(module.training_step(None, 0))
        finally:
            del base.transition

    checked = 0
    for name, p in params[:: max(1, len(params) // 4)]:
        for idx in [(0, 0), tuple(s - 1 for s in p.shape)]:
            h = 1e-6
            fd = (loss_with(p, idx, h) - loss_with(p, idx, -h)) / (2 * h)
            assert float(p.grad[idx]) == pytest.approx(fd, rel=1e-5, abs=1e-8), (name, idx)
            checked += float(p.grad[idx]) != 0
    assert checked >= 4  # the gradients tried are not all 0


# -- an adapter trained on DigitsFlow is the model every flow sampler samples ---------------------------------------
def test_a_flow_adapter_loads_into_every_flow_sampler(tmp_path):
    from tsf.samplers import RBF, SMC, SVDD, BestOfN
    from tsf.samplers.code import CoDe
    from tsf.samplers.sop import SoP

    module, _ = fit_flow(DRaFT, tmp_path, 2, validate=False, lr=0.01)
    trained = lora_state(module)
    tuned = DigitsFlow(num_steps=4, adapter=str(tmp_path / "adapter")).load()
    loaded = {k: v for k, v in tuned.net.named_parameters() if "lora_" in k}
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], v) for k, v in trained.items())
    reward = DigitReward("target", digit=3)
    samplers = [BestOfN(num_particles=2), SVDD(num_particles=2), SMC(num_particles=2, proposal="gradient"),
                RBF(num_particles=2, budget=20, n0=2), SoP(num_particles=2, num_paths=2), CoDe(num_particles=2)]
    for sampler in samplers:
        a = sampler.sample(tuned, reward, [None] * 2, [0, 1], seed=5).x0
        b = sampler.sample(DigitsFlow(num_steps=4), reward, [None] * 2, [0, 1], seed=5).x0
        assert (a - b).abs().max() > 1e-3, type(sampler).__name__


# -- tsf overopt --flow: its configs and its figure -------------------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_the_flow_overoptimisation_configs_share_model_reward_ids_and_seed():
    """The samplers of configs/overopt_flow and the fine-tuning configs configs/finetune/*_flow.yaml sample the same
    DigitsFlow kernel, reward the same 3, cross-check with the same CNN and are judged on the same 200 ids and seed."""
    import yaml

    from tsf.commands.overopt import DOMAINS

    folder, tunes, _, _ = DOMAINS["flow"]
    samplers = sorted((ROOT / "configs" / folder).glob("*.yaml"))
    assert {p.stem for p in samplers} == {"base", "best_of_n", "das_linear", "svdd_linear", "rbf_linear"}
    tuned = [yaml.safe_load((ROOT / f"configs/finetune/{m}.yaml").read_text())["model"]["init_args"] for m in tunes]
    for args in tuned + [yaml.safe_load(p.read_text())["model"]["init_args"] for p in samplers]:
        base = args["base"]
        assert base["class_path"] == "tsf.models.DigitsFlow"
        assert base["init_args"] == {"num_steps": 10, "interpolant": "linear", "diffusion": "square",
                                     "diffusion_norm": 3.0, "conditional": False}
        assert args["reward"] == {"class_path": "tsf.rewards.DigitReward",
                                  "init_args": {"classifier": "target", "digit": 3}}
        assert args["cross_rewards"] == [{"class_path": "tsf.rewards.DigitReward",
                                          "init_args": {"classifier": "holdout", "digit": 3}}]
    for args in tuned:
        assert args["conditions"] == [None] and args["val_samples"] == 200 and args["seed"] == 0
    for p in samplers:
        data = yaml.safe_load(p.read_text())["data"]["init_args"]
        assert data["conditions"] == [None] and data["num_samples"] == 200 and data["seed"] == 0
    assert [t["advantages"] for t in tuned[1:]] == ["ddpo", "grpo"] and tuned[2]["kl_coef"] > 0


def test_overopt_flow_draws_the_flow_runs(tmp_path, capsys):
    """``tsf overopt --flow --skip_runs`` reads the flow runs of its output directory (the samplers' run directories
    and the three flow fine-tuning runs), draws the figure and prints one table row each."""
    from tsf.commands.overopt import main as overopt

    keys = ("target/mean", "cross/digit_holdout/mean", "diversity/pairwise", "diversity/vendi")
    for i, name in enumerate(["base_K1_digit_seed0", "das_linear_K8_digit_seed0"]):
        (tmp_path / name).mkdir()
        nfe = {"compute/nfe": 10.0 + 70 * i, "compute/nfe_grad": 80.0 * i}
        (tmp_path / name / "metrics.json").write_text(json.dumps({**{k: -1.0 - i for k in keys}, **nfe}))
    for m in ("draft_flow", "ddpo_flow", "grpo_flow"):
        (tmp_path / f"finetune_{m}").mkdir()
        rows = [{"step": s, **{k: -s / 100 for k in keys}} for s in (50, 100)]
        (tmp_path / f"finetune_{m}" / "val_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "finetune_draft").mkdir()  # a diffusion run in the same folder is not the flow figure's
    (tmp_path / "finetune_draft" / "val_metrics.jsonl").write_text(json.dumps({"step": 1, **{k: 0 for k in keys}}))
    overopt(["--flow", "--skip_runs", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert (tmp_path / "overoptimisation_flow.png").stat().st_size > 0
    assert (tmp_path / "overoptimisation_flow.pdf").is_file()
    rows = [line for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    assert sorted(r.split(" | ")[0][2:] for r in rows) == ["base", "das_linear", "ddpo_flow step 100",
                                                         "draft_flow step 100", "grpo_flow step 100"]
    assert any(r.startswith("| das_linear |") and r.endswith("| 80 (+80 backward) |") for r in rows), rows


def test_flow_grpo_can_skip_the_last_step():
    """skip_last_step (Flow-GRPO's): the last step, noisy on the Linear-SDE (last_step: euler), is not among the
    trained steps and has no stored log-probability; the trajectories themselves are the same."""
    kw = dict(**digit3(batch_size=8, val_samples=20, seed=3), advantages="grpo", num_batches_per_epoch=1)
    plain, skip = (DDPO(DigitsFlow(num_steps=4), skip_last_step=s, **kw) for s in (False, True))
    for m in (plain, skip):
        m.configure_model()
    a, b = plain.sample_epoch(0), skip.sample_epoch(0)
    assert a["steps"] == [0, 1, 2, 3] and b["steps"] == [0, 1, 2]
    assert torch.equal(a["chain"], b["chain"]) and torch.equal(a["old_logp"][:, :3], b["old_logp"])
    assert b["old_logp"].shape == (8, 3)


def test_flow_grpo_can_leave_zero_advantage_samples_out(tmp_path):
    """skip_zero_advantage (Flow-GRPO's): with a reward of 0 every advantage is 0, so with a moved adapter (random
    LoRA B) the only gradient is the KL penalty's: without the option the adapter gets it, with it no sample is
    trained on and the adapter (weight decay 0) does not move."""
    moved = {}
    for skip in (False, True):
        probe = GradientsBeforeStep()
        module = DDPO(DigitsFlow(num_steps=4), **{**digit3(batch_size=8, val_samples=20, seed=3),
                                                  "reward": ZeroReward()},
                      advantages="grpo", kl_coef=0.5, weight_decay=0.0, num_batches_per_epoch=1,
                      skip_zero_advantage=skip)
        module.configure_model()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in module.base.net.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        before = lora_state(module)
        trainer = L.Trainer(max_steps=1, default_root_dir=str(tmp_path / str(skip)), logger=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            enable_checkpointing=False, callbacks=[probe])
        trainer.fit(module)
        after = lora_state(module)
        moved[skip] = max(float((after[k] - v).abs().max()) for k, v in before.items())
        metrics = read_metrics(tmp_path / str(skip))
        assert metrics[0]["kl"] > 0 if not skip else metrics[0]["kl"] == 0
    assert moved[False] > 0 and moved[True] == 0


def readme_snippet(marker: str) -> str:
    """The Python block that follows ``<!-- marker -->`` in the README."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text[text.index(f"<!-- {marker} -->"):]
    return block[block.index("```python\n") + len("```python\n"):block.index("\n```", block.index("```python"))]


def test_a_digits_adapter_names_its_base_model_and_the_readme_loads_it_with_peft_alone(tmp_path, monkeypatch):
    """``adapter_config.json`` of a fine-tuned digits adapter names ``tsf:digits_denoiser``; the README's snippet
    (run as written, in a directory holding ``runs/finetune_draft/adapter``) loads it with peft's ``PeftModel``
    and gives the fine-tuned network's output, which differs from the base network's."""
    from baselines.common import add_lora, save_lora
    from tsf.models import DigitsFlow
    from tsf.models.digits import base_network

    m = DigitsDiffusion(num_steps=5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_lora(m, rank=4)
    with torch.no_grad():
        for name, p in m.net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # a trained adapter (B starts at zero)
    adapter = tmp_path / "runs" / "finetune_draft" / "adapter"
    save_lora(m, adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tsf:digits_denoiser"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_snippet("peft-digits-adapter"), "README.md", "exec"), scope)
    x, t, labels = scope["x"], scope["t"], scope["labels"]
    with torch.no_grad():
        torch.testing.assert_close(scope["eps"], m.net.eval()(x, t, labels))  # tsf's fine-tuned network
        torch.testing.assert_close(scope["eps_base"], DigitsDiffusion().load().net(x, t, labels))
    assert (scope["eps"] - scope["eps_base"]).abs().max() > 1e-3
    # the flow's adapter names the flow (its time-scaling wrapper is the adapted module), and other weights by path
    flow = DigitsFlow(num_steps=4)
    add_lora(flow, rank=4)
    save_lora(flow, tmp_path / "flow")
    name = json.loads((tmp_path / "flow" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert name == "tsf:digits_flow"
    from peft import PeftModel

    assert isinstance(PeftModel.from_pretrained(base_network(name), str(tmp_path / "flow")), PeftModel)
    from tsf.models.digits import adapter_base_name, resolve_weights

    path = str(resolve_weights("digits_denoiser"))
    assert adapter_base_name(DigitsDiffusion(weights=path)) == f"tsf:DigitsDiffusion:{path}"
    assert type(base_network(f"tsf:DigitsDiffusion:{path}")).__name__ == "ResidualMLPDenoiser"
