"""Rewards: registry, digit classifiers and their confidence, compressibility, brightness."""

import math

import pytest
import torch

from tsf.errors import ConfigError
from tsf.models.digits import load_digits_splits
from tsf.rewards import REWARDS, Brightness, Compressibility, DigitReward, build_reward
from tsf.rewards.digits import DigitConfidence


def test_registry_names_and_unknown_name_lists_known_ones():
    assert {"digit", "digit_holdout", "digit_confidence", "digit_holdout_confidence", "compressibility",
            "brightness"} <= set(REWARDS.names())
    with pytest.raises(ConfigError, match="known rewards: .*brightness.*compressibility.*digit"):
        build_reward("aesthetics")


def test_digit_rewards_are_log_probabilities_of_the_condition_class():
    s = load_digits_splits()
    x, y = s.test_x[:200], s.test_y[:200].tolist()
    for name in ("digit", "digit_holdout"):
        r = build_reward(name).load()
        assert r.differentiable
        own = r(x, y)
        assert (own <= 0).all()
        # the true class is rewarded more than a wrong class on real digits
        wrong = r(x, [(c + 1) % 10 for c in y])
        assert (own > wrong).float().mean() > 0.9
        fixed = DigitReward(classifier="target" if name == "digit" else "holdout", digit=3).load()
        torch.testing.assert_close(fixed(x, None), r(x, [3] * 200))


def test_digit_reward_gradient_flows_to_images():
    r = build_reward("digit").load()
    x = load_digits_splits().test_x[:4].clone().requires_grad_(True)
    r(x, [0, 1, 2, 3]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("digit", [-1, 10, 12])
def test_digit_class_outside_range_is_refused(digit):
    with pytest.raises(ConfigError, match="0-9"):
        DigitReward(digit=digit)
    with pytest.raises(ConfigError, match="0-9"):
        build_reward("digit").check_conditions([digit])


def test_digit_reward_without_any_class_says_what_to_set():
    with pytest.raises(ConfigError, match="digit"):
        build_reward("digit").check_conditions([None])


def test_digit_confidence_is_the_max_class_log_probability_and_needs_no_class():
    s = load_digits_splits()
    x = torch.cat([s.test_x[:6], torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))])
    for name, classifier in (("digit_confidence", "target"), ("digit_holdout_confidence", "holdout")):
        conf = build_reward(name).load()
        assert isinstance(conf, DigitConfidence) and conf.name == name and conf.differentiable
        conf.check_conditions([None, 3])  # no class is read
        out = conf(x, [None] * 8)
        per_class = DigitReward(classifier=classifier).load()
        best = torch.stack([per_class(x, [k] * 8) for k in range(10)], 1).max(1).values
        torch.testing.assert_close(out, best)
        torch.testing.assert_close(out, conf(x))  # conditions are ignored
        assert (out <= 0).all() and out[:6].exp().min() > 0.5  # sure of real digits
        assert conf.has_features


def test_compressibility_prefers_simple_images():
    r = Compressibility()
    assert not r.differentiable
    flat = torch.full((1, 1, 8, 8), 0.5)
    noisy = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    rf, rn = r(torch.cat([flat, noisy]))
    assert rf > rn  # less negative: smaller JPEG
    # the (bilinear) upsampling makes the size depend on content, not only on JPEG headers: 8x8 digits
    # get many distinct sizes; nearest upsampling leaves each JPEG block one flat pixel (DC terms only)
    digits = load_digits_splits().test_x[:100]
    levels = {mode: len(set(Compressibility(upsample=mode)(digits).tolist())) for mode in ("bilinear", "nearest")}
    assert levels["bilinear"] > 50 and levels["bilinear"] > 2 * levels["nearest"]
    big = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # large images are not resized
    torch.testing.assert_close(r(big), Compressibility(upsample="nearest")(big))
    with pytest.raises(ConfigError, match="upsample"):
        Compressibility(upsample="area")


def test_brightness_is_mean_intensity_and_differentiable():
    x = torch.rand(3, 1, 8, 8, requires_grad=True)
    r = Brightness()
    out = r(x)
    torch.testing.assert_close(out, x.detach().flatten(1).mean(1))
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 64))


def _sample_error(*args, config="configs/digits/best_of_n.yaml", lines=False):
    """``tsf sample`` in this process on a tiny digits run: (exit code, the error line, or with ``lines`` all of
    stderr); (0, stderr) when it ran."""
    import contextlib
    import io
    from pathlib import Path

    from tsf.cli import main

    root = Path(__file__).resolve().parents[1]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(["sample", "--config", str(root / config), "--data.init_args.num_samples=8",
                  "--model.init_args.fidelity_samples=0", "--model.init_args.base.init_args.num_steps=4",
                  "--wandb_mode=disabled", "--trainer.enable_progress_bar=false", *args])
        except SystemExit as done:
            text = err.getvalue().strip()
            return int(done.code or 0), text if lines else text.splitlines()[-1]
    return 0, err.getvalue()


@pytest.mark.parametrize("cls, says", [
    ("Scalar", "returned shape [] for 2 images"), ("Wide", "returned shape [2, 8]"),
    ("Column", "drop the last dimension"), ("Detached", "carries no gradient")])
def test_a_users_reward_that_returns_the_wrong_thing_is_one_clear_line_before_any_sampling(tmp_path, cls, says):
    code, line = _sample_error(f"--output_dir={tmp_path}", f"--model.init_args.reward.class_path=user_rewards.{cls}")
    assert code == 2 and says in line and "user_rewards" in line, line
    assert not list(tmp_path.glob("*/shards/*"))  # refused before any batch


@pytest.mark.parametrize("cls, says", [("BFloat16Head", "likely a dtype mismatch"), ("OnCuda", "likely a device mismatch")])
def test_an_error_inside_a_users_reward_is_one_line_naming_the_reward_and_the_likely_cause(tmp_path, cls, says):
    if cls == "OnCuda" and torch.cuda.is_available():
        pytest.skip("the device error needs a machine without CUDA")
    code, line = _sample_error(f"--output_dir={tmp_path}", f"--model.init_args.reward.class_path=user_rewards.{cls}")
    assert code == 2 and says in line and f"user_rewards.{cls}" in line and "raised" in line, line
    assert not list(tmp_path.glob("*/shards/*"))


def test_a_float16_reward_is_accepted_and_said_once(tmp_path):
    code, err = _sample_error(f"--output_dir={tmp_path}", "--model.init_args.reward.class_path=user_rewards.Half",
                              "--model.init_args.cross_rewards=[]")
    assert code == 0 and err.count("returns float16; tsf casts its rewards to float32") == 1, err


def test_a_gradient_sampler_names_the_flag_a_reward_needs(tmp_path):
    code, line = _sample_error(f"--output_dir={tmp_path}", "--model.init_args.reward.class_path=user_rewards.NotMarked",
                               config="configs/digits/das.yaml")
    assert code == 2 and "differentiable = True" in line and "not marked differentiable" in line, line


def test_a_reward_module_that_does_not_import_shows_why(tmp_path):
    code, err = _sample_error(f"--output_dir={tmp_path}", "--model.init_args.reward.class_path=no_such_module.MyReward",
                              lines=True)
    assert code == 2, err
    assert "cannot import class_path 'no_such_module.MyReward' (ModuleNotFoundError: No module named 'no_such_module')" in err
    assert "PYTHONPATH" in err and "known samplers" not in err  # not a typo of a tsf name: no list of tsf's


def test_non_finite_target_rewards_are_counted_and_left_out_of_the_statistics(tmp_path):
    import json

    code, err = _sample_error(f"--output_dir={tmp_path}", "--model.init_args.reward.class_path=user_rewards.SometimesNaN",
                              "--model.init_args.reward.init_args={}", "--model.init_args.cross_rewards=[]",
                              config="configs/digits/base.yaml")
    assert code == 0, err
    (run,) = tmp_path.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    bad = metrics["target/nonfinite"]
    assert 0 < bad < 8 and math.isfinite(metrics["target/mean"]), metrics
    assert f"{bad:.0f} of 8 samples have a non-finite target reward" in err


def test_a_registry_lists_its_names_and_suggests_the_near_miss():
    from tsf.errors import ConfigError
    from tsf.rewards import REWARDS
    from tsf.samplers import SAMPLERS

    assert "best_of_n" in repr(SAMPLERS) and "svdd" in repr(SAMPLERS) and repr(SAMPLERS).startswith("Registry('sampler'")
    with pytest.raises(ConfigError, match=r"unknown reward 'digit_holdot' \(did you mean 'digit_holdout'\?\)"):
        REWARDS.get("digit_holdot")
