"""Rewards: registry, digit classifiers, compressibility, brightness."""

import pytest
import torch

from tsf.errors import ConfigError
from tsf.models.digits import load_digits_splits
from tsf.rewards import REWARDS, Brightness, Compressibility, DigitReward, build_reward


def test_registry_names_and_unknown_name_lists_known_ones():
    assert {"digit", "digit_holdout", "compressibility", "brightness"} <= set(REWARDS.names())
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


def test_compressibility_prefers_simple_images():
    r = Compressibility()
    assert not r.differentiable
    flat = torch.full((1, 1, 8, 8), 0.5)
    noisy = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    rf, rn = r(torch.cat([flat, noisy]))
    assert rf > rn  # less negative: smaller JPEG
    # the upsampling makes the size depend on content, not only on JPEG headers
    digits = load_digits_splits().test_x[:20]
    assert len(set(r(digits).tolist())) > 5


def test_brightness_is_mean_intensity_and_differentiable():
    x = torch.rand(3, 1, 8, 8, requires_grad=True)
    r = Brightness()
    out = r(x)
    torch.testing.assert_close(out, x.detach().flatten(1).mean(1))
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 64))
