"""Particle samplers: resampling, tempering, non-finite rewards, counted compute, digits gains."""

import math

import pytest
import torch

from tsf.errors import ConfigError
from tsf.models import DigitsDiffusion
from tsf.models.gmm import GaussianMixture
from tsf.rewards import LinearReward
from tsf.rewards import Compressibility, Reward, build_reward
from tsf.samplers import DPS, SMC, SVDD, BestOfN, NonFiniteRewardError
from tsf.samplers.base import Sampler
from tsf.samplers.smc import RESAMPLERS, resample, tempering_schedule


@pytest.mark.parametrize("method", RESAMPLERS)
def test_resamplers_copy_each_particle_k_w_times_on_average(method):
    torch.manual_seed(0)
    K, B = 8, 4000
    w = torch.tensor([0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0])
    logw = w.log().expand(B, K)
    idx = resample(logw, torch.rand(B, K), method)
    counts = torch.stack([torch.bincount(r, minlength=K) for r in idx]).double()
    assert (counts.sum(1) == K).all()
    assert counts[:, -1].sum() == 0  # a zero-weight particle is never chosen
    # mean copies K w; standard error at most sqrt(K w (1 - w) / B) (multinomial is the widest)
    se = (K * w * (1 - w) / B).sqrt().double() + 1e-12
    assert ((counts.mean(0) - K * w.double()).abs() <= 4 * se + 1e-9).all(), counts.mean(0)
    if method in ("systematic", "residual"):  # these keep at least floor(K w) copies of every particle
        assert (counts >= torch.floor(K * w).double()).all()


def test_tempering_schedules():
    ref = tempering_schedule(100, "gamma", 0.008, 0.87)
    assert ref[0] == 0 and ref[86] < 1 and ref[87] == 1.0 and ref[100] == 1.0
    short = tempering_schedule(20, "gamma", 0.008, 0.87)
    assert max(short[:20]) < 0.18  # the reference gamma barely tempers at T = 20 ...
    frac = tempering_schedule(20, "fraction", 0.008, 0.87)
    assert frac[17] == 1.0 and frac[16] < 1  # ... the T-independent form reaches 1 at 87% of any T
    assert tempering_schedule(10, "none", 0.0, 0.5) == [1.0] * 11
    with pytest.raises(ConfigError):
        tempering_schedule(10, "cosine", 0.0, 0.5)


def test_a_tempering_that_barely_acts_warns_and_the_shipped_configs_temper_at_any_T():
    """The reference gamma at T = 10 keeps lambda below 0.08 until the last step (DAS then equals Best-of-K):
    a warning says so; the fraction form at the same T and the reference at T = 100 say nothing. Every shipped
    config that tempers uses the fraction form."""
    import warnings

    from tsf.samplers.smc import warn_weak_tempering

    with pytest.warns(UserWarning, match=r"gamma: 0.008 reaches lambda = 0.07 at step 9 of T = 10.*fraction"):
        warn_weak_tempering(tempering_schedule(10, "gamma", 0.008, 0.87), "gamma", 0.008)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_weak_tempering(tempering_schedule(10, "fraction", 0.008, 0.87), "fraction", 0.008)
        warn_weak_tempering(tempering_schedule(100, "gamma", 0.008, 0.87), "gamma", 0.008)
    import yaml
    from pathlib import Path

    from tsf.identity import flatten_config

    tempered = 0
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")):
        flat = flatten_config(yaml.safe_load(path.read_text()) or {})
        for key, value in flat.items():
            if key.endswith("sampler.init_args.tempering"):
                assert value in ("none", "fraction"), path
                tempered += value == "fraction"
    assert tempered >= 8


class SometimesNaN(Reward):
    """The linear reward, but nan/inf when the first coordinate passes a threshold."""

    name = "sometimes_nan"
    differentiable = True

    def __init__(self, threshold):
        super().__init__()
        self.threshold = threshold

    def forward(self, x, conditions=None):
        r = x[:, 0] * 0.5
        r = torch.where(x[:, 0] > self.threshold, torch.full_like(r, float("nan")), r)
        return torch.where(x[:, 0] < -self.threshold, torch.full_like(r, float("inf")), r)


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.1, 0.1], num_steps=20)


@pytest.mark.parametrize("kw", [dict(), dict(proposal="gradient", tempering="fraction")])
def test_nonfinite_rewards_get_zero_weight_and_the_run_finishes(gmm, kw):
    n = 200
    with pytest.warns(UserWarning, match="not finite"):
        out = SMC(num_particles=8, alpha=1.0, grad_batch=10_000, **kw).sample(
            gmm, SometimesNaN(2.2), [None] * n, range(n), seed=0)
    assert out.diagnostics["nonfinite_values"] > 0
    assert torch.isfinite(out.x0).all() and torch.isfinite(out.diagnostics["log_z"]).all()
    assert torch.isfinite(out.rewards).all() and (out.x0[:, 0].abs() <= 2.2).all()


def test_a_group_with_no_finite_reward_is_a_clear_error(gmm):
    with pytest.raises(NonFiniteRewardError, match="every particle of a group"):
        SMC(num_particles=4, alpha=1.0).sample(gmm, SometimesNaN(-100.0), [None] * 3, range(3), seed=0)
    with pytest.raises(NonFiniteRewardError):
        SVDD(num_particles=4).sample(gmm, SometimesNaN(-100.0), [None] * 3, range(3), seed=0)


def test_svdd_nfe_is_counted_and_equals_one_plus_m_times_t_minus_one(gmm):
    r = LinearReward([0.5, 0.0])
    n, M, T = 50, 6, gmm.num_steps
    out = SVDD(num_particles=M).sample(gmm, r, [None] * n, range(n), seed=0)
    assert out.compute["nfe"] == n * (1 + M * (T - 1))
    assert out.compute["reward_calls"] == n * M * T  # one PM value per child (the last step: the reward)
    assert out.compute["nfe_grad"] == 0


def test_gradient_samplers_count_gradient_calls(gmm):
    r = LinearReward([0.5, 0.0])
    n, K, T = 10, 4, gmm.num_steps
    das = SMC(num_particles=K, alpha=1.0, proposal="gradient", tempering="fraction").sample(gmm, r, [None] * n, range(n))
    assert das.compute["nfe"] == n * K * T
    # one forward+backward per particle at every step but the last, whose DDIM kernel is deterministic
    assert gmm.step_std(T - 1) == 0 and das.compute["nfe_grad"] == n * K * (T - 1)
    dps = DPS(guidance_scale=0.1).sample(gmm, r, [None] * n, range(n))
    assert dps.compute["nfe_grad"] == n * T and dps.compute["nfe"] == n * T


@pytest.mark.parametrize("potential", ["max", "sum", "rt"])
def test_fk_potentials_without_a_resampling_schedule_are_config_errors(potential):
    """FK steering's max/sum/rt potentials act at the resampling steps: ESS-adaptive resampling gives them none."""
    with pytest.raises(ConfigError, match="resample_steps"):
        SMC(potential=potential)
    SMC(potential=potential, resample_steps=[5, 10])
    SMC(potential="diff")  # diff telescopes: fine with ESS-adaptive resampling


def test_diff_resampled_at_every_step_is_plain_smc_bit_for_bit(gmm):
    """A fixed schedule listing every step applies diff at every step, as ESS-adaptive SMC with threshold 1 does."""
    r = LinearReward([0.5, 0.25])
    n, T = 40, gmm.num_steps
    every = SMC(num_particles=8, alpha=1.0, resample_steps=list(range(T))).sample(gmm, r, [None] * n, range(n), seed=4)
    plain = SMC(num_particles=8, alpha=1.0, ess_threshold=1.0).sample(gmm, r, [None] * n, range(n), seed=4)
    assert plain.diagnostics["resampled"][:, :-1].all()  # ESS < K at every step: it resampled everywhere too
    assert torch.equal(every.x0, plain.x0) and torch.equal(every.rewards, plain.rewards)
    for key in ("log_z", "ess", "resampled"):
        assert torch.equal(every.diagnostics[key], plain.diagnostics[key]), key
    assert {k: v for k, v in every.compute.items() if k != "seconds"} == \
        {k: v for k, v in plain.compute.items() if k != "seconds"}


@pytest.mark.parametrize("potential", ["diff", "max", "sum", "rt"])
def test_fk_potentials_act_only_at_the_resampling_steps(gmm, potential):
    """With a fixed schedule and the base proposal the weights change only at the listed steps and at the
    end, and the reward is called only there (and at the prior, the start of max and sum): K (2 + 3) rows
    per sample instead of K (T + 1); the model is still called K T times."""
    r = LinearReward([0.5, 0.25])
    n, K, T, steps = 10, 4, gmm.num_steps, [4, 9, 14]
    out = SMC(num_particles=K, alpha=1.0, potential=potential, resample_steps=steps).sample(
        gmm, r, [None] * n, range(n), seed=0)
    assert out.compute["nfe"] == n * K * T
    assert out.compute["reward_calls"] == n * K * (len(steps) + 2)
    resampled = out.diagnostics["resampled"]
    assert resampled[:, steps].all() and int(resampled.sum()) == n * len(steps)
    ess = out.diagnostics["ess"]
    for i in range(1, T - 1):  # no potential at step i: the weights (and so the ESS) are those of step i - 1
        if i not in steps:
            expected = torch.full_like(ess[:, i], float(K)) if i - 1 in steps else ess[:, i - 1]
            torch.testing.assert_close(ess[:, i], expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kw", [dict(), dict(resample_steps=[4, 9, 14])])
def test_das_takes_no_gradient_for_a_step_without_noise(kw):
    """DAS/TDS use the gradient at x_i only in the proposal of step i: where that step's kernel std is 0 (here
    DDIM's last step, eta = 1, to abar = 1) no backward is taken. The counted nfe_grad is K times the number
    of noisy steps, and the samples are those of a run that takes the gradient at every step (the model
    hiding its stds, step_std None), bit for bit; with ESS-adaptive resampling and with a fixed schedule."""
    model = GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.1, 0.1], num_steps=10)
    r = LinearReward([0.5, 0.25])
    n, K, T = 12, 4, model.num_steps
    noisy = sum(float(model.step_std(i)) > 0 for i in range(T))
    assert noisy == T - 1
    das = SMC(num_particles=K, alpha=1.0, proposal="gradient", tempering="fraction", **kw)
    out = das.sample(model, r, [None] * n, range(n), seed=5)
    assert out.compute["nfe"] == n * K * T and out.compute["nfe_grad"] == n * K * noisy
    model.step_std = lambda i: None  # unknown stds: the gradient at every step before x0, as before
    every = das.sample(model, r, [None] * n, range(n), seed=5)
    assert every.compute["nfe_grad"] == n * K * T
    assert torch.equal(out.x0, every.x0) and torch.equal(out.diagnostics["log_z"], every.diagnostics["log_z"])


@pytest.mark.parametrize("sampler", ["svdd", "smc"])
def test_a_learned_value_runs_on_a_flow_model_with_the_flow_times(tmp_path, sampler):
    """SVDD-MC and SMC with a LearnedValue on the digits flow model: the value network sees 1000 s_i, the flow
    grid's time at each grid point where a value is used, in the diffusion timesteps' scale."""
    from tsf.models import DigitsFlow
    from tsf.models.digits import FLOW_TIME_SCALE, ResidualMLPDenoiser, save_network
    from tsf.samplers import LearnedValue

    torch.manual_seed(0)
    net = ResidualMLPDenoiser(dim=64, width=32, depth=1, hidden=32, out_dim=1)
    torch.nn.init.normal_(net.out[-1].weight, std=0.1)  # not the zero-initialised head: values differ per row
    save_network(net, tmp_path / "value.safetensors")
    value = LearnedValue(str(tmp_path / "value.safetensors")).load()
    seen = []
    value.net.register_forward_hook(lambda mod, args, out: seen.append(args[1].clone()))
    T, n, K = 5, 6, 4
    model, reward = DigitsFlow(num_steps=T).load(), build_reward("digit").load()
    if sampler == "svdd":
        out = SVDD(num_particles=K, value=value).sample(model, reward, [i % 10 for i in range(n)], range(n))
        used = range(1, T)  # the children at grid points 1 .. T - 1 (the last step is selected by the reward)
    else:
        out = SMC(num_particles=K, alpha=0.1, value=value).sample(model, reward, [i % 10 for i in range(n)], range(n))
        used = range(T)  # the prior and every step before x0
    assert torch.isfinite(out.x0).all() and torch.isfinite(out.rewards).all()
    assert len(seen) == len(used)
    for t, i in zip(seen, used):
        assert t.dtype == torch.float32 and t.shape == (n * K,)
        torch.testing.assert_close(t, torch.full_like(t, float(model._grid[i]) * FLOW_TIME_SCALE))


def test_gradient_methods_refuse_a_non_differentiable_reward():
    m = DigitsDiffusion(num_steps=5)
    with pytest.raises(ConfigError, match="differentiable"):
        SMC(proposal="gradient").sample(m, Compressibility(), [None], [0])
    with pytest.raises(ConfigError, match="differentiable"):
        DPS().sample(m, Compressibility(), [None], [0])


@pytest.mark.parametrize("kw", [dict(alpha=0.0), dict(ess_threshold=2.0), dict(resampler="best"),
                                dict(output="mean"), dict(grad_batch=0), dict(tempering="fraction", tempering_fraction=0)])
def test_bad_smc_settings_are_config_errors(kw):
    with pytest.raises(ConfigError):
        SMC(**kw)


def test_svdd_and_das_beat_best_of_n_on_digits_at_matched_nfe():
    """Best-of-8 (NFE 8 T), SVDD-PM with M = 8 (1 + 8 (T - 1)) and DAS with K = 8 (8 T), same seeds."""
    model, reward = DigitsDiffusion(num_steps=20).load(), build_reward("digit").load()
    n = 200
    conds, ids = [i % 10 for i in range(n)], range(n)
    runs = {
        "bon": BestOfN(num_particles=8).sample(model, reward, conds, ids),
        "svdd": SVDD(num_particles=8).sample(model, reward, conds, ids),
        "das": SMC(num_particles=8, alpha=0.1, proposal="gradient", tempering="fraction", output="argmax",
                   grad_batch=1024).sample(model, reward, conds, ids),
    }
    nfe = {k: v.compute["nfe"] / n for k, v in runs.items()}
    assert abs(nfe["svdd"] / nfe["bon"] - 1) <= 0.1 and abs(nfe["das"] / nfe["bon"] - 1) <= 0.1, nfe
    r = {k: reward(v.images, conds) for k, v in runs.items()}
    for k in ("svdd", "das"):
        diff = r[k] - r["bon"]  # paired on the same sample ids
        assert diff.mean() > 3 * diff.std() / math.sqrt(n), (k, diff.mean(), diff.std())


# -- gradient_through: tweedie (docs/algorithms.md, section 4) ------------------------------------------------------
class _Wavy(torch.nn.Module):
    """A small nonlinear 'network' ``net(x, t, labels)`` whose output depends on x (so holding it constant matters)."""

    def forward(self, x, t, labels=None):
        return torch.sin(1.3 * x) + 0.1 * x.square() + 1e-4 * t.float().reshape(-1, *([1] * (x.dim() - 1)))


def _tweedie_models():
    from tsf.models.diffusion import EpsDiffusionModel
    from tsf.models.digits import SCHEDULER_CONFIG
    from tsf.models.flow import FlowModel

    return {"eps": EpsDiffusionModel(_Wavy(), SCHEDULER_CONFIG, num_steps=10, sample_shape=(3,)),
            "v_prediction": EpsDiffusionModel(_Wavy(), SCHEDULER_CONFIG, num_steps=10, sample_shape=(3,),
                                              prediction_type="v_prediction"),
            "flow_linear": FlowModel(_Wavy(), num_steps=10, sample_shape=(3,)),
            "flow_vp": FlowModel(_Wavy(), num_steps=10, sample_shape=(3,), interpolant="vp")}


@pytest.mark.parametrize("kind", ["eps", "v_prediction", "flow_linear", "flow_vp"])
def test_tweedie_jacobian_is_the_slope_of_x0_hat_with_the_network_output_held_constant(kind):
    """Autograd of ``x0_hat(x, model(x))`` with the network's output detached (a forward hook), against
    ``tweedie_jacobian(i)`` times the identity, at every grid point; the full Jacobian differs (the network
    depends on x), so the test sees which one the method returns. Closed forms: eps ``1 / sqrt(abar)``,
    v ``sqrt(abar)``, linear flow 1, VP flow ``1 / c_s``."""
    model = _tweedie_models()[kind]
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model.double()
    c = torch.zeros(5)
    for i in range(model.num_steps):
        xs = x.clone().requires_grad_(True)
        full = torch.autograd.grad(model.x0_hat(xs, i, model(xs, i, c)).sum(), xs)[0]
        handle = model.net.register_forward_hook(lambda mod, args, out: out.detach())
        try:
            xs = x.clone().requires_grad_(True)
            held = torch.autograd.grad(model.x0_hat(xs, i, model(xs, i, c)).sum(), xs)[0]
        finally:
            handle.remove()
        J = model.tweedie_jacobian(i)
        torch.testing.assert_close(held, torch.full_like(held, J), rtol=1e-9, atol=1e-9)
        assert (full - held).abs().max() > 1e-3  # the network's own Jacobian is what tweedie leaves out
    if kind == "eps":
        assert model.tweedie_jacobian(3) == pytest.approx(float(model.abar[3]) ** -0.5, rel=1e-6)
    elif kind == "v_prediction":
        assert model.tweedie_jacobian(3) == pytest.approx(float(model.abar[3]) ** 0.5, rel=1e-6)
    elif kind == "flow_linear":
        assert all(model.tweedie_jacobian(i) == 1.0 for i in range(model.num_steps))


def test_the_tweedie_gradient_on_eps_prediction_is_the_reward_gradient_over_sqrt_abar():
    """On the digits denoiser (eps prediction) with the digit classifier: the tweedie gradient equals autograd
    through ``(x - sqrt(1 - abar) eps) / sqrt(abar)`` with eps detached, which is ``grad_{x0} r / sqrt(abar)``;
    the network gradient differs from it. Near zero signal-to-noise (the mixture's t = 999) it is 0."""
    from tsf.samplers.value import TWEEDIE_MAX_JACOBIAN, PosteriorMeanValue

    model, reward = DigitsDiffusion(num_steps=10).load(), build_reward("digit").load()
    conds = [3, 7, 1, 0]
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    c = model.encode_conditions(conds)
    pm = PosteriorMeanValue()
    for i in (2, 6):
        v, out, g = pm.tweedie_gradient(model, reward, x, i, c, conds)
        abar = float(model.abar[i])
        with torch.no_grad():
            eps = model(x, i, c)
        xs = x.clone().requires_grad_(True)
        x0 = (xs - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        ref = torch.autograd.grad(reward(model.decode(x0), conds).sum(), xs)[0]
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
        x0l = x0.detach().requires_grad_(True)
        g0 = torch.autograd.grad(reward(model.decode(x0l), conds).sum(), x0l)[0]
        torch.testing.assert_close(g, g0 / math.sqrt(abar), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(v, pm(model, reward, x, i, c, conds, 0.1)[0])  # the same value
        _, _, g_net = Sampler().value(model, reward, pm, x, i, c, conds, 0.1, grad=True)
        assert (g_net - g).abs().max() > 0.1 * g.abs().max()
    mixture = GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.1, 0.1], num_steps=100)
    assert mixture.tweedie_jacobian(0) > TWEEDIE_MAX_JACOBIAN > mixture.tweedie_jacobian(1)
    r = LinearReward([0.5, 0.25])
    xm = torch.randn(6, 2)
    cm = mixture.encode_conditions([None] * 6)
    assert not pm.tweedie_gradient(mixture, r, xm, 0, cm, [None] * 6)[2].any()
    torch.testing.assert_close(pm.tweedie_gradient(mixture, r, xm, 1, cm, [None] * 6)[2],
                               (r.direction * mixture.tweedie_jacobian(1)).expand(6, 2))


@pytest.mark.parametrize("sampler", ["das", "dps"])
def test_tweedie_gradients_take_no_backward_through_the_network(sampler):
    """DAS and DPS with gradient_through: tweedie on the digits denoiser: no network output carries a graph
    (a hook on the network), so nfe_grad is 0, while the reward's gradient rows are those of network DAS/DPS
    (K per noisy step, one per step for DPS); NFE unchanged."""
    model, reward = DigitsDiffusion(num_steps=6).load(), build_reward("digit").load()
    n, K, T = 3, 4, model.num_steps
    conds = [2, 5, 8]
    graphs = []
    model.net.register_forward_hook(lambda mod, args, out: graphs.append(out.requires_grad))
    make = (lambda through: SMC(num_particles=K, alpha=0.1, proposal="gradient", tempering="fraction",
                                gradient_through=through)) if sampler == "das" else \
        (lambda through: DPS(guidance_scale=0.1, gradient_through=through))
    out = make("tweedie").sample(model, reward, conds, range(n), seed=0)
    assert graphs and not any(graphs)
    net = make("network").sample(model, reward, conds, range(n), seed=0)
    assert any(graphs)
    assert out.compute["nfe_grad"] == 0 and net.compute["nfe_grad"] > 0
    assert out.compute["nfe"] == net.compute["nfe"]
    assert out.compute["reward_grad_calls"] == net.compute["reward_grad_calls"] == \
        (n * K * (T - 1) if sampler == "das" else n * T)
    assert torch.isfinite(out.x0).all() and not torch.equal(out.x0, net.x0)


def test_gradient_through_settings_are_checked():
    with pytest.raises(ConfigError, match="posterior-mean"):
        SMC(proposal="gradient", value="exact", gradient_through="tweedie")
    with pytest.raises(ConfigError, match="proposal: gradient"):
        SMC(gradient_through="tweedie")
    with pytest.raises(ConfigError, match="gradient_through"):
        DPS(gradient_through="vae")
    assert "tweedie" in repr(SMC(proposal="gradient", gradient_through="tweedie"))
