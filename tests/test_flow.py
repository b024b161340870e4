"""Flow models: the VP interpolant conversion against closed forms, and SDE sampling of the mixture."""

import math
from pathlib import Path

import pytest
import torch

from tsf.errors import ConfigError
from tsf.models.flow import linear_schedule, vp_schedule
from tsf.models.gmm import GaussianMixtureFlow
from tsf.rewards import LinearReward
from tsf.samplers import SMC, SVDD, BaseSampler, BestOfN

MIX = dict(weights=[0.3, 0.7], means=[[-2.0, 0.0], [2.0, 0.5]], covariances=[0.25, [0.3, 0.1]])


def test_vp_schedule_derivatives_match_finite_differences():
    s = torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=torch.float64)
    h = 1e-6
    up, down, mid = vp_schedule(s + h), vp_schedule(s - h), vp_schedule(s)
    for key in ("alpha", "sigma", "t", "c"):
        fd = (up[key] - down[key]) / (2 * h)
        torch.testing.assert_close(mid[f"{key}_dot"], fd, rtol=1e-6, atol=1e-8)
    # signal-to-noise matching: c (1 - t) = abar and c t = sbar
    torch.testing.assert_close(mid["c"] * (1 - mid["t"]), mid["alpha"])
    torch.testing.assert_close(mid["c"] * mid["t"], mid["sigma"])
    assert torch.equal(linear_schedule(s)["t"], s)


@pytest.mark.parametrize("interpolant", ["linear", "vp"])
def test_converted_velocity_score_and_tweedie_are_the_closed_forms(interpolant):
    m = GaussianMixtureFlow(**MIX, num_steps=10, interpolant=interpolant)
    post = m.posterior
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for i in (1, 4, 8):
        a, s = m._alpha[i], m._sigma[i]
        ad, sd = m._alpha_dot[i], m._sigma_dot[i]
        score, x0 = post.score_and_x0(x, a, s)  # the interpolant's own marginal sum_k pi_k N(a m_k, a^2 S_k + s^2 I)
        eps = (x - a * x0) / s
        u = m(x.float(), i, m.encode_conditions([None] * 6)).double()
        torch.testing.assert_close(u, ad * x0 + sd * eps, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m.x0_hat(x, i, u), x0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m.score(x, i, u), score, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("interpolant,diffusion", [("linear", "square"), ("vp", "square"), ("linear", "constant")])
def test_sde_sampling_reproduces_the_data_mixture(interpolant, diffusion):
    """200 Euler-Maruyama steps, 4,000 samples: weights within 3 SE, means within 3 SE + 0.02 (discretisation)."""
    m = GaussianMixtureFlow(**MIX, num_steps=200, interpolant=interpolant, diffusion=diffusion,
                            diffusion_norm=3.0 if diffusion == "square" else 1.0)
    n = 4000
    x0 = BaseSampler(max_batch=10**5).sample(m, None, [None] * n, range(n), seed=0).x0
    comp = m.component_of(x0)
    for k, (p, mean, var) in enumerate(zip([0.3, 0.7], MIX["means"], [[0.25, 0.25], [0.3, 0.1]])):
        frac = (comp == k).double().mean().item()
        assert abs(frac - p) < 3 * math.sqrt(p * (1 - p) / n), (k, frac)
        nk = int((comp == k).sum())
        err = (x0[comp == k].double().mean(0) - torch.tensor(mean, dtype=torch.float64)).abs()
        assert (err < 3 * (torch.tensor(var, dtype=torch.float64) / nk).sqrt() + 0.02).all(), (k, err)


def test_ode_flow_refuses_particle_methods_that_need_children():
    ode = GaussianMixtureFlow(**MIX, num_steps=5, diffusion="none")
    r = LinearReward([1.0, 0.0])
    for sampler in (SVDD(num_particles=4), SMC(num_particles=4)):
        with pytest.raises(ConfigError, match="deterministic.*diffusion: square"):
            sampler.sample(ode, r, [None], [0])
    assert BestOfN(num_particles=4).sample(ode, r, [None] * 3, range(3)).x0.shape == (3, 2)  # ODE Best-of-N is fine


@pytest.mark.parametrize("kw", [dict(interpolant="cosine"), dict(diffusion="cubic"), dict(diffusion_norm=-1.0),
                                dict(time_grid="log"), dict(num_steps=0)])
def test_bad_flow_settings_are_config_errors(kw):
    with pytest.raises(ConfigError):
        GaussianMixtureFlow(**MIX, **kw)


@pytest.mark.parametrize("budget,N,n0,T,batch", [(120, 2, 4, 20, 1), (200, 2, 2, 20, 4), (500, 2, 25, 10, 16),
                                                (500, 3, 8, 20, 16), (101, 1, 3, 5, 7), (77, 4, 1, 10, 3)])
def test_rbf_spends_exactly_its_counted_budget(budget, N, n0, T, batch):
    """NFE are counted by hooks per evaluated row: the candidates plus every child, which must add up to
    the budget (within one proposal batch, never above it) whatever N, n0, T and the proposal batch."""
    from tsf.samplers import RBF

    m = GaussianMixtureFlow(**MIX, num_steps=T, interpolant="vp")
    n = 12
    out = RBF(num_particles=N, budget=budget, n0=n0, proposal_batch=batch).sample(
        m, LinearReward([0.5, 0.25]), [None] * n, range(n), seed=0)
    assert n * (budget - batch) < out.compute["nfe"] <= n * budget
    assert out.diagnostics["unspent_nfe"] == 0
    assert torch.isfinite(out.x0).all()


def test_rbf_reference_finish_is_the_full_finish_on_a_tweedie_last_step():
    """``finish: tweedie`` stops at grid point T - 1 and returns x0_hat there; a flow model whose last step
    returns x0_hat makes the full finish do the same, so the two give the same samples (and the
    model's last transition is then x0_hat with no noise)."""
    from tsf.samplers import RBF

    m = GaussianMixtureFlow(**MIX, num_steps=8, interpolant="vp", time_grid="reference", last_step="tweedie")
    x = torch.randn(5, 2)
    tr = m.transition(x, 7, m.encode_conditions([None] * 5))
    torch.testing.assert_close(tr.mean, tr.x0_hat, rtol=1e-6, atol=1e-6)
    assert float(tr.std.max()) == 0.0
    r, n = LinearReward([0.5, 0.25]), 16
    ref = RBF(budget=80, n0=4, finish="tweedie").sample(m, r, [None] * n, range(n), seed=3)
    full = RBF(budget=80, n0=4, finish="full").sample(m, r, [None] * n, range(n), seed=3)
    torch.testing.assert_close(ref.x0, full.x0, rtol=1e-5, atol=1e-5)
    assert ref.compute["nfe"] == full.compute["nfe"] == 80 * n


class _NaNBeyond(LinearReward):
    """The linear reward, NaN where the first coordinate passes ``threshold``."""

    name = "nan_beyond"

    def __init__(self, threshold):
        super().__init__([0.5, 0.25])
        self.threshold = threshold

    def forward(self, x, conditions=None):
        r = super().forward(x, conditions)
        return torch.where(x[:, 0] > self.threshold, torch.full_like(r, float("nan")), r)


@pytest.mark.parametrize("finish", ["full", "tweedie"])
def test_rbf_raises_when_every_child_of_a_step_is_non_finite(finish):
    """As SVDD, CoDe, SoP and SMC do: a step whose children all have non-finite values is a NonFiniteRewardError
    (before, the chain silently kept its state of the step before, at the wrong grid point). A reward that is
    non-finite on part of the space leaves the run finite: such children are never kept."""
    from tsf.samplers import RBF, NonFiniteRewardError

    m = GaussianMixtureFlow(**MIX, num_steps=6)
    n = 8
    with pytest.raises(NonFiniteRewardError, match="every child of a chain"):
        RBF(budget=40, n0=2, finish=finish).sample(m, _NaNBeyond(-100.0), [None] * n, range(n), seed=0)
    out = RBF(budget=40, n0=2, finish=finish).sample(m, _NaNBeyond(2.5), [None] * n, range(n), seed=0)
    assert torch.isfinite(out.x0).all() and torch.isfinite(out.rewards).all()


def test_rbf_budget_too_small_and_ode_are_clear_errors():
    from tsf.samplers import RBF

    sde = GaussianMixtureFlow(**MIX, num_steps=20)
    with pytest.raises(ConfigError, match="too small"):
        RBF(num_particles=4, budget=50, n0=4).sample(sde, LinearReward([1.0, 0.0]), [None], [0])
    with pytest.raises(ConfigError, match="deterministic"):
        RBF().sample(GaussianMixtureFlow(**MIX, num_steps=5, diffusion="none"), LinearReward([1.0, 0.0]), [None], [0])


@pytest.mark.parametrize("budget", [50, 200])
def test_for_budget_sizes_every_method_to_the_same_counted_nfe(budget):
    from tsf.samplers import RBF

    m = GaussianMixtureFlow(**MIX, num_steps=10, interpolant="vp")
    r, n = LinearReward([0.5, 0.25]), 20
    for cls in (BestOfN, SVDD, SMC, RBF):
        kw = cls.for_budget(budget, m.num_steps)
        if cls is RBF:
            kw.update(num_particles=1, n0=2)
        out = cls(**kw).sample(m, r, [None] * n, range(n), seed=0)
        nfe = out.compute["nfe"] / n
        assert nfe <= budget and (cls is RBF or nfe >= 0.9 * budget), (cls.__name__, nfe)


def test_scaling_command_writes_table_and_figure(tmp_path):
    from tsf.commands.scaling import main

    root = Path(__file__).resolve().parents[1] / "configs/gmm_flow"
    main([str(root / "ode_bon.yaml"), str(root / "svdd_vp.yaml"), "--budgets", "40", "80",
          "--output_dir", str(tmp_path), "--", "--data.init_args.num_samples=10", "--model.init_args.fidelity_samples=20",
          "--wandb_mode=disabled", "--trainer.enable_progress_bar=false"])
    assert (tmp_path / "scaling.png").stat().st_size > 0 and (tmp_path / "scaling.pdf").is_file()
    table = (tmp_path / "scaling.md").read_text().splitlines()
    assert len(table) == 2 + 4
    nfe = {row.split("|")[1].strip(): row for row in table[2:]}
    # the overrides passed on are in each run's name (and config)
    assert set(nfe) == {f"{m}_nfe{b}_fidelity_samples=20_num_samples=10" for m in ("ode_bon", "svdd_vp") for b in (40, 80)}


def test_rbf_beats_ode_best_of_n_on_digits_at_100_nfe():
    """Paired on 200 sample ids: RBF (Linear-SDE, budget 100) vs Best-of-10 with the Linear-ODE (T = 10)."""
    from tsf.models import DigitsFlow
    from tsf.rewards import build_reward
    from tsf.samplers import RBF

    reward = build_reward("digit").load()
    n = 200
    conds = [i % 10 for i in range(n)]
    ode = DigitsFlow(num_steps=10, diffusion="none")
    sde = DigitsFlow(num_steps=10, diffusion="square")
    bon = BestOfN(**BestOfN.for_budget(100, 10)).sample(ode, reward, conds, range(n))
    rbf = RBF(num_particles=2, budget=100, n0=4).sample(sde, reward, conds, range(n))
    assert rbf.compute["nfe"] <= bon.compute["nfe"] == 100 * n
    diff = reward(rbf.images, conds) - reward(bon.images, conds)
    assert diff.mean() > 3 * diff.std() / math.sqrt(n), (diff.mean(), diff.std())
