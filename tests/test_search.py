"""Search over paths (SoP), CoDe and noise-space search (random and zero-order): each method's defining property.

Counted NFE equal the formula (and ``for_budget`` sizes each to its budget); SoP and CoDe with one candidate are the
base sampler; CoDe with blocks of one step is SVDD; zero-order search never ends below its starting noise's verifier
score; Best-of-N's verifier ranks the candidates.
"""

import math

import pytest
import torch

from tsf.errors import ConfigError
from tsf.models.gmm import GaussianMixture, GaussianMixtureFlow
from tsf.rewards import LinearReward
from tsf.samplers import SAMPLERS, SVDD, BaseSampler, BestOfN, CoDe, SoP, ZeroOrderSearch
from tsf.samplers.noise_search import neighbours
from tsf.samplers.sop import default_levels

MIX = dict(weights=[0.3, 0.7], means=[[-2.0, 0.0], [2.0, 0.5]], covariances=[0.25, [0.3, 0.1]])
R = LinearReward([1.0, 0.0])


def flow(T=10, **kw):
    return GaussianMixtureFlow(**MIX, num_steps=T, **kw)


def ddim(T=10, eta=0.0):
    return GaussianMixture(**MIX, num_steps=T, eta=eta)


def run(sampler, model, n=12, seed=0, reward=R):
    return sampler.sample(model, reward, [None] * n, range(n), seed=seed)


# ----------------------------------------------------------------------------- the forward process
@pytest.mark.parametrize("model", [flow(interpolant="linear"), flow(interpolant="vp"), ddim()],
                         ids=["linear", "vp", "ddim"])
def test_renoise_keeps_the_marginals(model):
    """From ``x_i = a_i x0 + s_i eps`` (a fixed x0), ``renoise`` to ``j < i`` gives ``a_j x0 + s_j eps'``."""
    g = torch.Generator().manual_seed(0)
    n, x0 = 40000, torch.tensor([1.5, -0.5], dtype=torch.float64)
    for i, j in [(8, 3), (10, 2), (5, 4), (9, 0)]:
        (a_i, s_i), (a_j, s_j) = model.marginal(i), model.marginal(j)
        x = a_i * x0 + s_i * torch.randn(n, 2, generator=g, dtype=torch.float64)
        y = model.renoise(x, i, j, torch.randn(n, 2, generator=g, dtype=torch.float64))
        torch.testing.assert_close(y.mean(0), a_j * x0, rtol=0, atol=4 * s_j / math.sqrt(n) + 1e-12)
        torch.testing.assert_close(y.var(0), torch.full((2,), s_j**2, dtype=torch.float64), rtol=0.03, atol=1e-9)
    assert model.marginal(model.num_steps)[1] < 0.05  # x0 at the last grid point
    x = torch.randn(3, 2)
    assert model.renoise(x, 4, 4, torch.randn(3, 2)) is x
    with pytest.raises(ValueError):
        model.renoise(x, 3, 5, torch.randn(3, 2))


# ----------------------------------------------------------------------------- SoP
def sop_nfe(N, K, i0, df, db, T, value_calls):
    """The formula, from the levels: N i0 + N K (b - a) per round, + N K per round before x0 (value calls)."""
    nfe, j = N * i0, i0
    while j < T:
        a, b = j - df, min(T, j - df + db)
        nfe += N * K * (b - a) + (N * K if value_calls and b < T else 0)
        j = b
    return nfe


@pytest.mark.parametrize("N,K,i0,df,db,T,value", [
    (2, 5, 8, 7, 8, 10, "posterior_mean"), (2, 5, 8, 7, 8, 10, "last_step"), (1, 3, 4, 2, 5, 12, "posterior_mean"),
    (3, 2, 1, 1, 3, 7, "posterior_mean"), (2, 4, 9, 0, 1, 10, "exact"), (1, 1, 3, 3, 9, 6, "posterior_mean")])
@pytest.mark.parametrize("kind", ["flow", "ddim"])
def test_sop_counts_the_nfe_of_its_formula(N, K, i0, df, db, T, value, kind):
    model = flow(T, diffusion="none") if kind == "flow" else ddim(T)
    s = SoP(num_paths=N, num_particles=K, first_level=i0, forward_steps=df, backward_steps=db, value=value)
    n = 6
    out = run(s, model, n)
    expected = sop_nfe(N, K, i0, df, db, T, value == "posterior_mean")
    assert out.compute["nfe"] == n * expected == n * s.planned_nfe(T)
    assert out.compute["reward_calls"] == n * N * K * len(s.rounds(T))
    assert torch.isfinite(out.x0).all() and torch.equal(out.rewards, R(out.x0))


@pytest.mark.parametrize("model", [flow(10, diffusion="none"), flow(10, interpolant="vp", diffusion="none"), ddim(10)],
                         ids=["linear-ode", "vp-ode", "ddim-eta0"])
def test_sop_with_one_candidate_and_no_renoising_is_the_base_sampler(model):
    n = 20
    base = run(BaseSampler(), model, n, seed=3)
    for i0, db in [(3, 4), (7, 1), (1, 9)]:
        sop = run(SoP(num_paths=1, num_particles=1, first_level=i0, forward_steps=0, backward_steps=db), model, n, 3)
        assert torch.equal(sop.x0, base.x0), (i0, db)


def test_sop_with_one_candidate_samples_the_base_distribution():
    """K = 1, N = 1: no selection, and re-noising by the forward process keeps the marginals, so the samples are the
    data mixture's (weights within 3 SE, component means within 3 SE + 0.05 for the ODE's discretisation)."""
    T, n = 20, 3000
    model = flow(T, diffusion="none")
    s = SoP(num_paths=1, num_particles=1, max_batch=10**5)
    assert s.levels(T) == default_levels(T) == (16, 14, 16) and len(s.rounds(T)) == 2
    x0 = run(s, model, n).x0.double()
    comp = model.component_of(x0)
    for k, (p, mean, var) in enumerate(zip([0.3, 0.7], MIX["means"], [[0.25, 0.25], [0.3, 0.1]])):
        frac = (comp == k).double().mean().item()
        assert abs(frac - p) < 3 * math.sqrt(p * (1 - p) / n), (k, frac)
        err = (x0[comp == k].mean(0) - torch.tensor(mean, dtype=torch.float64)).abs()
        assert (err < 3 * (torch.tensor(var, dtype=torch.float64) / int((comp == k).sum())).sqrt() + 0.05).all()


def test_sop_selects_the_best_candidates():
    """More candidates per path raise the reward (paired on the same sample ids), and the output's reward is the
    best of the last round's candidates (the returned reward is the output's)."""
    model, n = flow(10, diffusion="none"), 200
    base = run(BaseSampler(), model, n)
    one = run(SoP(num_paths=2, num_particles=1), model, n)
    five = run(SoP(num_paths=2, num_particles=5), model, n)
    d = R(five.x0) - R(base.x0)
    assert d.mean() > 3 * d.std() / math.sqrt(n)
    assert R(five.x0).mean() > R(one.x0).mean()
    torch.testing.assert_close(five.rewards, R(five.x0))


@pytest.mark.parametrize("kw", [dict(first_level=10), dict(first_level=0), dict(first_level=3, forward_steps=4),
                                dict(forward_steps=3, backward_steps=3), dict(num_paths=0)])
def test_bad_sop_levels_are_config_errors(kw):
    with pytest.raises(ConfigError):
        run(SoP(**kw), flow(10, diffusion="none"), 2)


# ----------------------------------------------------------------------------- CoDe
@pytest.mark.parametrize("N,K,L,T", [(2, 5, 2, 10), (1, 4, 3, 10), (3, 2, 1, 7), (2, 3, 12, 8), (2, 2, 4, 9)])
def test_code_counts_n_times_one_plus_k_times_t_minus_one(N, K, L, T):
    n = 6
    out = run(CoDe(num_paths=N, num_particles=K, block_size=L), flow(T), n)
    blocks = math.ceil(T / L)
    assert out.compute["nfe"] == n * N * (1 + K * (T - 1))
    assert out.compute["reward_calls"] == n * N * K * blocks  # one value per child and block (the last: the reward)
    torch.testing.assert_close(out.rewards, R(out.x0))


@pytest.mark.parametrize("model", [flow(10), flow(10, interpolant="vp"), ddim(10, eta=1.0)],
                         ids=["linear-sde", "vp-sde", "ddim-eta1"])
def test_code_with_one_child_is_the_base_sampler(model):
    n = 20
    base = run(BaseSampler(), model, n, seed=5)
    for L in (1, 2, 3, 10):
        code = run(CoDe(num_paths=1, num_particles=1, block_size=L), model, n, seed=5)
        assert torch.equal(code.x0, base.x0), L


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_code_with_blocks_of_one_step_is_svdd(alpha):
    model, n = flow(10), 20
    svdd = run(SVDD(num_particles=6, alpha=alpha), model, n, seed=2)
    code = run(CoDe(num_paths=1, num_particles=6, block_size=1, alpha=alpha), model, n, seed=2)
    assert torch.equal(code.x0, svdd.x0)
    assert code.compute["nfe"] == svdd.compute["nfe"]


def test_code_keeps_the_best_chain_and_beats_the_base():
    model, n = flow(10), 200
    base = run(BaseSampler(), model, n)
    code = run(CoDe(num_paths=2, num_particles=4, block_size=2), model, n)
    d = R(code.x0) - R(base.x0)
    assert d.mean() > 3 * d.std() / math.sqrt(n)


def test_code_needs_children():
    with pytest.raises(ConfigError, match="deterministic"):
        run(CoDe(), flow(10, diffusion="none"), 2)
    for kw in (dict(block_size=0), dict(num_paths=0), dict(alpha=-1.0)):
        with pytest.raises(ConfigError):
            CoDe(**kw)


# ----------------------------------------------------------------------------- noise-space search
def test_neighbours_keep_the_norm_and_turn_by_arccos_lambda():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 3, 4, 4, generator=g), torch.randn(50, 3, 4, 4, generator=g)
    y = neighbours(x, w, 0.95)
    xf, yf = x.flatten(1).double(), y.flatten(1).double()
    torch.testing.assert_close(yf.norm(dim=1), xf.norm(dim=1))
    torch.testing.assert_close((xf * yf).sum(1) / (xf.norm(dim=1) * yf.norm(dim=1)),
                               torch.full((50,), 0.95, dtype=torch.float64))
    assert not torch.allclose(neighbours(x, torch.randn(50, 3, 4, 4, generator=g), 0.95), y)


class Shifted(LinearReward):
    """A verifier that is not the target: another direction."""

    name = "shifted"


@pytest.mark.parametrize("model", [flow(10, diffusion="none"), ddim(10)], ids=["ode", "ddim-eta0"])
def test_zero_order_search_never_scores_below_its_starting_noise(model):
    n, verifier = 60, Shifted([0.2, 1.0])
    for v in (None, verifier):
        zo = ZeroOrderSearch(num_particles=3, num_initial=4, num_rounds=5, verifier=v)
        out = run(zo, model, n, seed=1)
        score = out.rewards if v is None else out.diagnostics["verifier"]
        # the starting noise is Best-of-n's choice (the same first noises), and the search never ends below it
        bon = run(BestOfN(num_particles=4, verifier=v), model, n, seed=1)
        start = bon.rewards if v is None else bon.diagnostics["verifier"]
        torch.testing.assert_close(out.diagnostics["start_score"], start)
        assert (score >= start).all() and (score > start).any()
        torch.testing.assert_close(score, (v or R)(out.x0))
        assert out.diagnostics["moves"].max() <= 5 and out.diagnostics["moves"].sum() > 0
        assert (v is None) == (out.rewards is not None)
        # no rounds: Best-of-n itself
        zero = run(ZeroOrderSearch(num_particles=3, num_initial=4, num_rounds=0, verifier=v), model, n, seed=1)
        assert torch.equal(zero.x0, bon.x0)


def test_zero_order_search_counts_t_times_n_plus_r_m():
    T, n = 10, 8
    out = run(ZeroOrderSearch(num_particles=3, num_initial=5, num_rounds=4), flow(T, diffusion="none"), n)
    assert out.compute["nfe"] == n * T * (5 + 4 * 3)
    assert out.compute["reward_calls"] == n * (5 + 4 * 3)
    for kw in (dict(lam=1.0), dict(lam=0.0), dict(num_initial=0), dict(num_rounds=-1)):
        with pytest.raises(ConfigError):
            ZeroOrderSearch(**kw)


class Constant(LinearReward):
    """A verifier that scores every sample alike: no neighbour ever beats its pivot."""

    name = "constant"

    def forward(self, x, conditions=None):
        return torch.zeros(x.shape[0], device=x.device)


def test_zero_order_search_reference_variant():
    """tt-scale-flux's loop (variant: reference), each of its three behaviours: (1) it starts from one noise, the
    base sampler's (its first round's pivot scores what the base sample of that seed does); (2) every round runs
    the pivot again with its M neighbours (NFE T R (M + 1), the pivot first in each round's batch, and a pivot that
    moved is the best neighbour of the round before: cosine lam to the pivot before it); (3) after a round in
    which no neighbour beats the pivot the next pivot is a fresh noise (cosine near 0 to the old one, with a
    verifier that ties everything: every round fails). The output is the best run of all rounds."""
    T, n, M, rounds = 10, 24, 3, 4
    model = flow(T, diffusion="none")
    zo = ZeroOrderSearch(num_particles=M, num_rounds=rounds, variant="reference")
    seen = []
    run_batch = zo._run
    zo._run = lambda model_, reward_, z, *a: (seen.append(z.view(n, M + 1, -1).clone()), run_batch(model_, reward_, z, *a))[1]
    out = run(zo, model, n, seed=2)
    base = run(BaseSampler(), model, n, seed=2)
    torch.testing.assert_close(out.diagnostics["start_score"], R(base.x0))                    # (1)
    assert out.compute["nfe"] == n * T * rounds * (M + 1)                                     # (2)
    assert out.compute["reward_calls"] == n * rounds * (M + 1) and len(seen) == rounds
    assert (out.rewards >= out.diagnostics["start_score"]).all()
    torch.testing.assert_close(out.rewards, R(out.x0))
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)  # noqa: E731
    moved = out.diagnostics["moves"]
    assert moved.sum() > 0 and out.diagnostics["restarts"].sum() > 0
    assert torch.equal(moved + out.diagnostics["restarts"], torch.full((n,), float(rounds)))
    fresh = 0
    for k in range(1, rounds):  # a pivot that moved is a neighbour of the one before (its norm, cosine lam); else a
        old, new = seen[k - 1][:, 0], seen[k][:, 0]  # fresh noise (another norm, in no direction of the last batch)
        neighbour = (cos(new[:, None], seen[k - 1][:, 1:]) > 1 - 1e-6).any(1)
        torch.testing.assert_close(cos(new, old)[neighbour], torch.full_like(cos(new, old)[neighbour], 0.95))
        torch.testing.assert_close(new[neighbour].norm(dim=1), old[neighbour].norm(dim=1))
        assert ((new[~neighbour].norm(dim=1) - old[~neighbour].norm(dim=1)).abs() > 1e-4).all()
        assert (cos(new[~neighbour, None], seen[k - 1][~neighbour]) < 1 - 1e-6).all()
        fresh += int((~neighbour).sum())
    assert fresh > 0
    tied = run(ZeroOrderSearch(num_particles=M, num_rounds=rounds, variant="reference", verifier=Constant([0.0, 0.0])),
               model, n, seed=2)
    assert (tied.diagnostics["restarts"] == rounds).all() and (tied.diagnostics["moves"] == 0).all()       # (3)
    with pytest.raises(ConfigError, match="one noise"):
        ZeroOrderSearch(num_initial=4, variant="reference")
    with pytest.raises(ConfigError):
        ZeroOrderSearch(num_rounds=0, variant="reference")


def test_best_of_n_ranks_by_its_verifier():
    """Random search: the same candidates, chosen by the verifier, whose calls are the counted reward calls."""
    model, n, N = flow(10, diffusion="none"), 100, 8
    verifier = Shifted([0.0, 1.0])
    target = run(BestOfN(num_particles=N), model, n)
    by_v = run(BestOfN(num_particles=N, verifier=verifier), model, n)
    assert by_v.rewards is None
    torch.testing.assert_close(by_v.diagnostics["verifier"], verifier(by_v.x0))
    assert (verifier(by_v.x0) >= verifier(target.x0)).all() and (R(target.x0) >= R(by_v.x0)).all()
    assert (verifier(by_v.x0) > verifier(target.x0)).any()
    assert by_v.compute["reward_calls"] == n * N and by_v.compute["nfe"] == n * N * 10
    # the verifier alone is enough: no target reward needed to sample
    assert BestOfN(num_particles=2, verifier=verifier).sample(model, None, [None], [0]).x0.shape == (1, 2)


# ----------------------------------------------------------------------------- budgets and registry
@pytest.mark.parametrize("budget", [50, 100, 200, 500])
def test_for_budget_sizes_each_search_to_its_budget(budget):
    T, n = 10, 4
    for cls, model, step in [(SoP, flow(T, diffusion="none"), None), (CoDe, flow(T), 2 * (T - 1)),
                             (ZeroOrderSearch, flow(T, diffusion="none"), T)]:
        kw = cls.for_budget(budget, T)
        s = cls(**kw)
        if cls is SoP:
            assert s.planned_nfe(T) == sop_nfe(kw["num_paths"], kw["num_particles"], *s.levels(T), T, True)
            step = kw["num_paths"] * (s.planned_nfe(T) - kw["num_paths"] * s.levels(T)[0]) // kw["num_particles"]
        nfe = run(s, model, n).compute["nfe"] / n
        assert budget - step < nfe <= budget, (cls.__name__, kw, nfe)
    assert SoP.for_budget(200, 10) == dict(num_paths=2, num_particles=5, first_level=8, forward_steps=7,
                                           backward_steps=8)
    assert CoDe.for_budget(200, 10) == dict(num_paths=2, num_particles=11)
    assert ZeroOrderSearch.for_budget(200, 10) == dict(num_particles=4, num_initial=4, num_rounds=4)


def test_the_searches_are_registered():
    assert {"sop": SoP, "code": CoDe, "zo_search": ZeroOrderSearch}.items() <= {
        k: SAMPLERS.get(k) for k in SAMPLERS.names()}.items()


def test_best_of_n_never_picks_a_non_finite_candidate():
    """torch.argmax ranks NaN above every number; Best-of-N must pick among the finite rewards."""
    from tsf.models import GaussianMixture
    from tsf.rewards import Reward

    class HalfNaN(Reward):
        name = "half_nan"

        def forward(self, images, conditions=None):
            r = images.flatten(1)[:, 0].float()
            return torch.where(torch.arange(len(r)) % 2 == 0, torch.full_like(r, float("nan")), r)

    m = GaussianMixture(weights=[0.5, 0.5], means=[[-2.0, 0.0], [2.0, 0.0]], covariances=[[[1.0, 0.0], [0.0, 1.0]]] * 2,
                        num_steps=5)
    out = BestOfN(num_particles=4).sample(m, HalfNaN(), [None] * 6, range(6))
    assert torch.isfinite(out.rewards).all()
