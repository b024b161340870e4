"""The Gaussian kernel of the eps-prediction model against diffusers' own schedulers."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from tsf.errors import ConfigError
from tsf.models.diffusion import EpsDiffusionModel

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}


class TinyNet(nn.Module):
    """A fixed nonlinear eps-predictor: enough to make every step's output differ."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 16)

    def forward(self, x, t, labels):
        return torch.tanh(self.lin(x.flatten(1)) + t[:, None] / 1000).reshape(x.shape)


def model(**kw):
    return EpsDiffusionModel(TinyNet(), SCHED, sample_shape=(1, 4, 4), **kw).load()


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("num_steps", [10, 50])
def test_ddim_transition_matches_diffusers_step(eta, num_steps):
    m = model(num_steps=num_steps, eta=eta)
    ref = DDIMScheduler(clip_sample=False, **SCHED)
    ref.set_timesteps(num_steps)
    assert torch.equal(ref.timesteps.long(), m.timesteps)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 4, 4, generator=g)
    c = torch.zeros(6, dtype=torch.long)
    for i, t in enumerate(ref.timesteps):
        noise = torch.randn(x.shape, generator=g)
        tr = m.transition(x, i, c)
        out = ref.step(tr.output, t, x, eta=eta, variance_noise=noise)
        torch.testing.assert_close(tr.x0_hat, out.pred_original_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tr.sample(noise), out.prev_sample, rtol=1e-5, atol=1e-5)
        x = out.prev_sample
    if eta == 0:
        assert float(m.step_std(3)) == 0.0


def test_ddpm_transition_matches_diffusers_step():
    m = model(num_steps=20, scheduler="ddpm")
    ref = DDPMScheduler(clip_sample=False, **SCHED)
    ref.set_timesteps(20)
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    c = torch.zeros(5, dtype=torch.long)
    for i, t in enumerate(ref.timesteps):
        tr = m.transition(x, i, c)
        gen_seed = 100 + i
        out = ref.step(tr.output, t, x, generator=torch.Generator().manual_seed(gen_seed))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(gen_seed))
        torch.testing.assert_close(tr.sample(noise), out.prev_sample, rtol=1e-4, atol=1e-5)
        x = out.prev_sample


def test_log_prob_is_the_gaussian_density():
    m = model(num_steps=10, eta=1.0)
    x = torch.randn(4, 1, 4, 4)
    tr = m.transition(x, 2, torch.zeros(4, dtype=torch.long))
    x_prev = tr.sample(torch.randn_like(x))
    ref = torch.distributions.Normal(tr.mean, tr.std.expand_as(tr.mean)).log_prob(x_prev).flatten(1).sum(1)
    torch.testing.assert_close(m.log_prob(x_prev, tr), ref)
    # the transition is exactly N(mean, std^2 I): std from the DDIM formula
    abar, abar_prev = m.abar[2].double(), m.abar_prev[2].double()
    s = math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    assert abs(float(tr.std.flatten()[0]) - s) < 1e-6


def test_final_step_lands_on_tweedie():
    m = model(num_steps=10, eta=1.0)
    x = torch.randn(3, 1, 4, 4)
    tr = m.transition(x, 9, torch.zeros(3, dtype=torch.long))
    assert float(tr.std.max()) == 0.0
    torch.testing.assert_close(tr.mean, tr.x0_hat)


def test_cached_output_is_reused_without_a_forward_call():
    m = model(num_steps=10)
    calls = []
    m.register_forward_hook(lambda *a: calls.append(1))
    x, c = torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    tr = m.transition(x, 0, c)
    tr2 = m.transition(x, 0, c, output=tr.output)
    assert len(calls) == 1
    torch.testing.assert_close(tr.mean, tr2.mean)


def test_classifier_free_guidance_combines_conditional_and_null():
    class LabelNet(nn.Module):
        def forward(self, x, t, labels):
            return x * 0 + labels[:, None, None, None].float()

    m = EpsDiffusionModel(LabelNet(), SCHED, num_classes=10, guidance_scale=3.0, sample_shape=(1, 4, 4))
    eps = m(torch.zeros(2, 1, 4, 4), 0, torch.tensor([2, 5]))
    # eps_u + w (eps_c - eps_u) with the null label 10
    torch.testing.assert_close(eps[:, 0, 0, 0], 10 + 3.0 * (torch.tensor([2.0, 5.0]) - 10))


@pytest.mark.parametrize("kw", [{"num_steps": 0}, {"eta": -1.0}, {"scheduler": "euler"},
                                {"scheduler": "ddpm", "eta": 0.0}])
def test_bad_kernel_settings_are_config_errors(kw):
    with pytest.raises(ConfigError):
        model(**kw)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [30, 400])
def test_every_transition_ends_on_the_next_grid_point(spacing, num_steps):
    m = EpsDiffusionModel(TinyNet(), {**SCHED, "timestep_spacing": spacing}, num_steps=num_steps, sample_shape=(1, 4, 4))
    abar = m.scheduler.alphas_cumprod
    torch.testing.assert_close(m.abar_prev[:-1], abar[m.timesteps[1:]].float())
    assert float(m.abar_prev[-1]) == 1.0
