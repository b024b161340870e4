"""Reward mixtures (``tsf.rewards.WeightedSum``, registered ``weighted_sum``): the sum, its terms logged beside it,
every kind of sampler and both fine-tuning baselines."""

import json
from pathlib import Path

import pytest
import torch

from tsf.cli import load_samples, main
from tsf.errors import ConfigError
from tsf.rewards import REWARDS, Brightness, DigitReward, WeightedSum, build_reward

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--data.init_args.num_samples=6", "--data.init_args.batch_size=6", "--model.init_args.fidelity_samples=0",
         "--model.init_args.base.init_args.num_steps=4", "--model.init_args.sampler.init_args.num_particles=2",
         "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--wandb_mode=disabled"]
# a mixture of a registered name, a class path and a class path with init_args, one term normalised
MIXTURE = ("{class_path: tsf.rewards.WeightedSum, init_args: {terms: {digit: 1.0, tsf.rewards.Brightness: 2.0, "
           "holdout: {class_path: tsf.rewards.DigitReward, init_args: {classifier: holdout}, weight: 0.5, "
           "shift: -1.0, scale: 4.0}}}}")


def test_the_sum_is_the_weighted_normalised_terms_and_differentiable_only_if_every_term_is():
    r = WeightedSum({"digit": 1.0, "tsf.rewards.Brightness": 2.0,
                     "hold": {"class_path": "digit_holdout", "weight": 0.5, "shift": -1.0, "scale": 4.0}})
    assert r.labels == ["digit", "brightness", "hold"] and r.differentiable
    assert not any(t._loaded for t in r.terms)  # nothing loads at construction
    r.load()
    assert all(t._loaded for t in r.terms)
    x = torch.rand(5, 1, 8, 8, requires_grad=True)
    conds = [1, 2, 3, 4, 5]
    parts = [DigitReward().load()(x, conds), Brightness()(x), DigitReward("holdout").load()(x, conds)]
    expected = parts[0] + 2.0 * parts[1] + 0.5 * (parts[2] + 1.0) / 4.0
    total, terms = r.evaluate(x, conds)
    torch.testing.assert_close(r(x, conds), expected)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(terms, torch.stack(parts, 1).detach())
    assert torch.autograd.grad(r(x, conds).sum(), x)[0].abs().sum() > 0
    assert not WeightedSum({"digit": 1.0, "compressibility": 1.0}).differentiable
    # the features are the first term's that has any (the digit classifier's)
    torch.testing.assert_close(r.features(x), DigitReward().load().features(x))
    assert not WeightedSum({"brightness": 1.0}).has_features


def test_mixture_configuration_errors_are_one_clear_line():
    with pytest.raises(ConfigError, match="did you mean 'digit'"):
        WeightedSum({"digti": 1.0})
    with pytest.raises(ConfigError, match="no weight"):
        WeightedSum({"digit": {"scale": 2.0}})
    with pytest.raises(ConfigError, match="needs terms"):
        build_reward("weighted_sum")
    with pytest.raises(ConfigError, match="not a tsf.rewards.Reward"):
        WeightedSum({"torch.nn.Linear": 1.0})
    assert "weighted_sum" in REWARDS


@pytest.mark.parametrize("config, extra", [
    ("best_of_n", []),
    ("svdd_pm", []),
    ("das", ["--model.init_args.sampler.init_args.grad_batch=6"]),  # SMC with gradient proposals: DAS
])
def test_every_sampler_takes_a_mixture_and_logs_each_term_beside_the_sum(tmp_path, config, extra):
    wandb = "offline" if config == "best_of_n" else "disabled"  # (wandb's log read back once)
    main(["sample", "--config", str(ROOT / f"configs/digits/{config}.yaml"), *SMALL, *extra,
          f"--model.init_args.reward={MIXTURE}", f"--output_dir={tmp_path}", "--run_name=run", f"--wandb_mode={wandb}"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    samples = load_samples(tmp_path / "run")
    rewards = samples["rewards"]
    assert set(rewards) == {"weighted_sum", "weighted_sum/digit", "weighted_sum/brightness",
                            "weighted_sum/holdout", "digit_holdout"}
    # the sum is the terms' weighted sum, per sample, and each term's mean is logged beside the target's
    torch.testing.assert_close(rewards["weighted_sum"], rewards["weighted_sum/digit"] + 2.0 * rewards[
        "weighted_sum/brightness"] + 0.5 * (rewards["weighted_sum/holdout"] + 1.0) / 4.0, atol=1e-5, rtol=0)
    for term in ("digit", "brightness", "holdout"):
        assert metrics[f"target/{term}/mean"] == pytest.approx(float(rewards[f"weighted_sum/{term}"].mean()), abs=1e-5)
    assert metrics["target/mean"] == pytest.approx(float(rewards["weighted_sum"].mean()), abs=1e-5)
    # the holdout term is the cross-reward digit_holdout on the same samples
    torch.testing.assert_close(rewards["weighted_sum/holdout"], rewards["digit_holdout"])
    if wandb == "offline":  # wandb's summary holds the terms beside the sum
        from wandb_log import read_run

        summary = read_run(tmp_path / "run")[1]
        for key in ("target/mean", "target/digit/mean", "target/brightness/mean", "target/holdout/mean"):
            assert summary[key] == pytest.approx(metrics[key], rel=1e-6), key


def test_a_gradient_sampler_refuses_a_mixture_with_a_term_that_is_not_differentiable(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--config", str(ROOT / "configs/digits/das.yaml"), *SMALL,
              "--model.init_args.reward={class_path: tsf.rewards.WeightedSum, init_args: {terms: "
              "{digit: 1.0, compressibility: 0.1}}}", f"--output_dir={tmp_path}", "--run_name=run"])
    assert "not marked differentiable" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["draft", "ddpo"])
def test_a_baseline_fine_tunes_on_a_mixture_and_validates_each_term(tmp_path, method):
    main(["finetune", "--config", str(ROOT / f"configs/finetune/{method}.yaml"), "--model.init_args.batch_size=4",
          "--model.init_args.val_samples=6", "--model.init_args.base.init_args.num_steps=3",
          "--trainer.enable_progress_bar=false", "--wandb_mode=disabled", "--trainer.max_steps=2",
          "--trainer.val_check_interval=2", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
          "--model.init_args.reward={class_path: tsf.rewards.WeightedSum, init_args: {terms: "
          "{three: {class_path: tsf.rewards.DigitReward, init_args: {digit: 3}, weight: 1.0}, brightness: 0.5}}}",
          f"--output_dir={tmp_path}", "--run_name=ft"])
    line = json.loads((tmp_path / "ft" / "val_metrics.jsonl").read_text().splitlines()[-1])
    assert {"target/mean", "target/three/mean", "target/brightness/mean"} <= set(line)
    assert line["target/mean"] == pytest.approx(line["target/three/mean"] + 0.5 * line["target/brightness/mean"],
                                                abs=1e-4)
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").is_file()
