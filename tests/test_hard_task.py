"""The hard digits task: the log-odds reward (unbounded, exact where p rounds to 1, with blind spots the CNN
does not share), its configs running end to end, and the statistics behind `tsf claims`' verdicts."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tsf.cli import main
from tsf.commands import claims as C
from tsf.commands.bench import untrained_value_checkpoint
from tsf.models.digits import load_digits_splits
from tsf.rewards import REWARDS, DigitLogOdds, build_reward

ROOT = Path(__file__).resolve().parents[1]


def test_log_odds_is_log_p_minus_log_one_minus_p_and_stays_finite():
    assert {"digit_log_odds", "digit_holdout_log_odds"} <= set(REWARDS.names())
    s = load_digits_splits()
    x, y = s.test_x[:300], s.test_y[:300].tolist()
    for name, prob in (("digit_log_odds", "digit"), ("digit_holdout_log_odds", "digit_holdout")):
        r, p = build_reward(name).load(), build_reward(prob).load()
        assert r.differentiable and r.name == name
        lo, logp = r(x, y), p(x, y).double()
        ok = logp < -1e-3  # where 1 - p is representable, the closed form in float64
        expected = logp - torch.log1p(-logp.exp())
        torch.testing.assert_close(lo.double()[ok], expected[ok], atol=1e-3, rtol=1e-4)
        assert torch.isfinite(lo).all()
        # unbounded where log p saturates: real digits the classifier is sure of score far above 0
        sure = logp > -1e-6
        assert sure.any() and (lo[sure] > 10).all()
        # the same order as log p (a monotone function of it) wherever float32 resolves log p
        order = torch.argsort(logp[ok])
        assert (lo[ok][order].diff() >= -1e-3).all()
    torch.testing.assert_close(DigitLogOdds(digit=3).load()(x, None), build_reward("digit_log_odds").load()(x, [3] * 300))


def test_log_odds_gradient_flows_and_its_ascent_exploits_the_mlp_not_the_cnn():
    """The blind spots the README describes: ascent on the MLP's log-odds from real digits raises it far
    past any real digit while the CNN's log-probability of the same class falls."""
    r, cnn = build_reward("digit_log_odds").load(), build_reward("digit_holdout").load()
    s = load_digits_splits()
    x0, y = s.test_x[:64], s.test_y[:64].tolist()
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        (-r(x, y).sum()).backward()
        assert x.grad.abs().sum() > 0
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    with torch.no_grad():
        real_max = r(s.test_x, s.test_y.tolist()).max()
        assert r(x, y).mean() > real_max + 5          # beyond every real test digit
        assert cnn(x, y).mean() < cnn(x0, y).mean() - 0.3  # and the CNN is less sure of the class


HARD = sorted([*(ROOT / "configs/digits_hard").glob("*.yaml"), *(ROOT / "configs/digits_flow_hard").glob("*.yaml")])


FAST = {("digits_hard", "das"), ("digits_flow_hard", "rbf_vp")}  # the rest (about 5 s each) under -m slow


@pytest.mark.parametrize("path", [pytest.param(p, marks=() if (p.parent.name, p.stem) in FAST else pytest.mark.slow)
                                  for p in HARD if p.stem != "value"], ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_hard_configs_run(path, tmp_path):
    cfg = yaml.safe_load(path.read_text())["model"]["init_args"]
    assert cfg["reward"] == "digit_log_odds" and cfg["cross_rewards"] == ["digit_holdout"]
    extra = []
    if path.stem == "svdd_mc":  # a value network of the right shape, untrained (the real one needs tsf fit)
        extra.append(f"--model.init_args.sampler.init_args.value.init_args.checkpoint={untrained_value_checkpoint()}")
    if "flow" not in path.parent.name:  # the flow configs' T = 10 is small already (SoP's levels need it)
        extra.append("--model.init_args.base.init_args.num_steps=6")
    main(["sample", "--config", str(path), f"--output_dir={tmp_path}", "--data.init_args.num_samples=10",
          "--model.init_args.fidelity_samples=50",
          "--wandb_mode=disabled", "--trainer.enable_progress_bar=false", *extra])
    (run,) = tmp_path.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(metrics["target/mean"]) and "cross/digit_holdout/mean" in metrics and "fidelity/fd" in metrics


def test_hard_value_config_names_the_checkpoint_svdd_mc_reads():
    value = yaml.safe_load((ROOT / "configs/digits_hard/value.yaml").read_text())
    mc = yaml.safe_load((ROOT / "configs/digits_hard/svdd_mc.yaml").read_text())
    assert value["model"]["init_args"]["reward"] == "digit_log_odds"
    checkpoint = mc["model"]["init_args"]["sampler"]["init_args"]["value"]["init_args"]["checkpoint"]
    assert Path(checkpoint).parent == Path(value["trainer"]["default_root_dir"])


# ----------------------------------------------------------------------------- the claims' statistics
def _fake_run(d: Path, ids, rewards: dict, images=None) -> Path:
    d.mkdir(parents=True)
    n = len(ids)
    images = images if images is not None else torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    torch.save({"sample_id": torch.as_tensor(ids), "images": images,
                "rewards": {k: torch.as_tensor(v, dtype=torch.float32) for k, v in rewards.items()}}, d / "samples.pt")
    return d


def test_paired_difference_matches_the_standard_error_of_the_differences(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    base = rng.normal(size=n)
    a = base + 0.3 + 0.1 * rng.normal(size=n)  # strongly paired: the difference is resolved
    perm = rng.permutation(n)                    # rows stored in any order: matched by sample id
    ra = _fake_run(tmp_path / "a", perm, {"r": a[perm]})
    rb = _fake_run(tmp_path / "b", np.arange(n), {"r": base})
    d = C.paired(ra, rb, "r")
    diff = a - base
    se = diff.std(ddof=1) / np.sqrt(n)
    assert d.diff == pytest.approx(diff.mean(), abs=1e-6)
    assert d.hi - d.lo == pytest.approx(2 * 1.96 * se, rel=1e-4)
    assert d.resolved == 1 and C.verdict([d]) == "holds"
    assert C.paired(rb, ra, "r").resolved == -1 and C.verdict([d, C.paired(rb, ra, "r")]) == "fails"
    # only the shared ids count, and a non-finite reward is left out as the evaluator does
    rc = _fake_run(tmp_path / "c", np.arange(n // 2), {"r": np.r_[np.nan, base[1: n // 2]]})
    assert C.paired(rc, rb, "r").diff == pytest.approx(0.0, abs=1e-7)
    noise = _fake_run(tmp_path / "e", np.arange(n), {"r": base + rng.normal(size=n)})
    assert C.paired(noise, rb, "r").resolved == 0  # a mean-zero difference with sd 1 over 400: |z| < 1.96 here
    assert C.verdict([d, C.paired(noise, rb, "r")]) == "unresolved"


def test_set_metric_diversity_prefers_the_spread_set(tmp_path):
    s = load_digits_splits()
    n = 120
    spread = (s.test_x[:n] * 255).round().to(torch.uint8)
    collapsed = spread[s.test_y[:n] == 1][:1].expand(n, -1, -1, -1).clone()  # one image n times
    ra = _fake_run(tmp_path / "a", np.arange(n), {"r": np.zeros(n)}, spread)
    rb = _fake_run(tmp_path / "b", np.arange(n), {"r": np.zeros(n)}, collapsed)
    d = C.set_metric(ra, rb, "diversity", num_resamples=50)
    assert d.b == pytest.approx(0.0, abs=1e-6) and d.a > 0.3 and d.resolved == 1
