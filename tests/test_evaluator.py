"""The shared evaluator's diversity and fidelity math, and its metric keys."""

import pytest
import torch

from tsf.evaluation import Evaluator, frechet_distance, pairwise_cosine_distance, vendi_score
from tsf.rewards import Brightness, Reward
from tsf.samplers.base import SampleBatch


def test_pairwise_cosine_distance_matches_brute_force():
    f = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    u = torch.nn.functional.normalize(f.double(), dim=1)
    cos = u @ u.T
    brute = (1 - cos)[~torch.eye(30, dtype=torch.bool)].mean()
    assert abs(pairwise_cosine_distance(f) - float(brute)) < 1e-10


def test_vendi_score_counts_effective_modes():
    e = torch.eye(4)
    assert abs(vendi_score(e.repeat(5, 1)) - 4.0) < 1e-6      # 4 orthogonal modes, equally used
    assert abs(vendi_score(torch.ones(10, 3)) - 1.0) < 1e-6   # all identical
    # against the n x n kernel definition
    f = torch.randn(25, 6, generator=torch.Generator().manual_seed(1))
    u = torch.nn.functional.normalize(f.double(), dim=1)
    lam = torch.linalg.eigvalsh(u @ u.T / 25).clamp(min=0)
    lam = lam[lam > 1e-12]
    assert abs(vendi_score(f) - float(torch.exp(-(lam * lam.log()).sum()))) < 1e-8


def test_frechet_distance_is_zero_for_same_set_and_grows_with_shift():
    a = torch.randn(500, 4, generator=torch.Generator().manual_seed(2))
    assert abs(frechet_distance(a, a)) < 1e-6
    # shift of the mean by 1 in every coordinate adds |mu1 - mu2|^2 = 4
    assert abs(frechet_distance(a, a + 1) - 4.0) < 1e-6


class Half(Reward):
    name = "half"

    def forward(self, images, conditions=None):
        return images.flatten(1).mean(1) / 2


def test_evaluator_keys_and_per_sample_compute():
    ev = Evaluator(Brightness(), [Half()])
    ev.set_reference(torch.rand(50, 1, 4, 4, generator=torch.Generator().manual_seed(3)))
    for k in range(3):
        imgs = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(k))
        batch = SampleBatch(x0=imgs, images=imgs, sample_ids=torch.arange(10 * k, 10 * k + 10),
                            compute={"nfe": 500.0, "reward_calls": 80.0, "seconds": 1.0})
        ev.update(batch, ev.rewards(batch, [None] * 10))
    m = ev.compute()
    assert set(m) == {"target/mean", "target/median", "target/q90", "target/nonfinite", "cross/half/mean", "diversity/pairwise",
                      "diversity/vendi", "fidelity/fd", "compute/nfe", "compute/nfe_grad", "compute/reward_calls",
                      "compute/reward_grad_calls", "compute/model_rows", "compute/decode_rows", "compute/reward_rows",
                      "compute/seconds"}
    assert m["compute/nfe"] == 50.0 and m["compute/reward_calls"] == 8.0 and m["compute/nfe_grad"] == 0.0
    assert abs(m["cross/half/mean"] - m["target/mean"] / 2) < 1e-6
    assert m["target/q90"] >= m["target/median"]


def test_frechet_distance_matches_the_matrix_square_root_formula():
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with scipy's sqrtm, on correlated features."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g, dtype=torch.float64)
    a = torch.randn(400, 8, generator=g, dtype=torch.float64) @ mix
    b = torch.randn(300, 8, generator=g, dtype=torch.float64) @ mix.T * 1.5 + 0.3
    sa, sb = (torch.cov(x.T).numpy() for x in (a, b))
    root = scipy_linalg.sqrtm(sa @ sb).real
    expected = float(((a.mean(0) - b.mean(0)) ** 2).sum() + sa.trace() + sb.trace() - 2 * root.trace())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_vendi_decomposes_the_smaller_gram_matrix_so_large_raw_pixels_fit_in_memory():
    import tracemalloc

    f = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))  # n < d: the n x n kernel
    u = torch.nn.functional.normalize(f.double(), dim=1)
    lam = torch.linalg.eigvalsh(u.T @ u / 6).clamp(min=0)  # the d x d definition
    lam = lam[lam > 1e-12]
    assert abs(vendi_score(f) - float(torch.exp(-(lam * lam.log()).sum()))) < 1e-8
    # 8 raw 512 px RGB images (d = 786,432): a d x d Gram matrix would be 4.9 TB; the n x n one is 512 bytes
    big = torch.rand(8, 3 * 512 * 512, generator=torch.Generator().manual_seed(3))
    tracemalloc.start()
    v = vendi_score(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 1 < v <= 8 and peak < 1e9


def test_feature_less_rewards_on_large_float16_images_give_bounded_float_metrics():
    from tsf.evaluation import PIXEL_FEATURE_SIZE, pixel_features

    images = torch.rand(4, 3, 512, 512, generator=torch.Generator().manual_seed(4)).half()
    feats = pixel_features(images)
    assert feats.dtype == torch.float32 and feats.shape == (4, 3 * PIXEL_FEATURE_SIZE**2)
    ev = Evaluator(Brightness(), [])
    batch = SampleBatch(x0=images, sample_ids=torch.arange(4), images=images)
    ev.update(batch, ev.rewards(batch, [None] * 4))
    m = ev.compute()
    assert all(torch.isfinite(torch.tensor(m[k])) for k in ("target/mean", "diversity/pairwise", "diversity/vendi"))


def test_a_failing_metric_is_named_in_one_line_and_the_others_are_still_computed(capsys, monkeypatch):
    import tsf.evaluation as E

    def boom(features):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(E, "vendi_score", boom)
    ev = Evaluator(Brightness(), [])
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    batch = SampleBatch(x0=images, sample_ids=torch.arange(5), images=images)
    ev.update(batch, ev.rewards(batch, [None] * 5))
    m = ev.compute()
    assert m["diversity/vendi"] != m["diversity/vendi"]  # NaN
    assert m["target/mean"] == pytest.approx(float(images.mean((1, 2, 3)).mean()), abs=1e-6)
    assert m["diversity/pairwise"] > 0
    err = capsys.readouterr().err
    assert "metric diversity/vendi failed (_LinAlgError: linalg.eigh: The algorithm failed to converge)" in err
    assert len([line for line in err.splitlines() if "failed" in line]) == 1


def test_samples_are_written_before_the_metrics_and_a_failing_metric_keeps_the_run(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    import tsf.evaluation as E
    from tsf.cli import load_samples, main

    def boom(a, b):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(E, "frechet_distance", boom)
    root = Path(__file__).resolve().parents[1]
    main(["sample", "--config", str(root / "configs/gmm/best_of_n.yaml"), f"--output_dir={tmp_path}",
          "--data.init_args.num_samples=20", "--model.init_args.fidelity_samples=50",
          "--model.init_args.base.init_args.num_steps=10", "--wandb_mode=disabled",
          "--trainer.enable_progress_bar=false"])
    (run,) = tmp_path.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fidelity/fd"] != metrics["fidelity/fd"] and metrics["target/mean"] == metrics["target/mean"]
    assert load_samples(run)["x0"].shape == (20, 2)
