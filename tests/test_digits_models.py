"""The shipped digits models meet the quality the README records, and the recipe runs."""

import json
import re
from pathlib import Path

import pytest
import torch

import tsf.models.digits as D
from tsf.models import DigitsDiffusion, DigitsFlow
from tsf.samplers import BaseSampler

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_weights_are_small_safetensors():
    files = sorted(D.WEIGHTS_DIR.glob("*.safetensors"))
    assert {f.stem for f in files} == {D.DENOISER, D.FLOW, D.MASKED, *D.CLASSIFIERS.values()}
    # fp16: 2.2 MB per 1.1M-parameter generator, 3.3 MB for the masked one (1.66M: its one-hot input is 64 x 18)
    assert sum(f.stat().st_size for f in files) < 9e6


def test_classifiers_differ_in_architecture_and_data_and_are_accurate():
    s = D.load_digits_splits()
    assert len(set(s.half_a.tolist()) & set(s.half_b.tolist())) == 0
    assert len(s.half_a) + len(s.half_b) == len(s.train_y)
    target, holdout = D.load_network("digits_classifier_mlp"), D.load_network("digits_classifier_cnn")
    assert type(target) is not type(holdout)
    for net in (target, holdout):
        acc = (net(s.test_x).argmax(1) == s.test_y).float().mean().item()
        assert acc >= 0.95, acc


def test_base_samples_are_recognisable_digits():
    """>= 80% of 1,000 base samples get cross-classifier confidence >= 0.9 (README's number)."""
    model = DigitsDiffusion().load()
    batch = BaseSampler().sample(model, None, [None] * 1000, torch.arange(1000), seed=0)
    conf = D.load_network("digits_classifier_cnn")(batch.images).softmax(-1).max(-1).values
    frac = (conf >= 0.9).float().mean().item()
    assert frac >= 0.8, frac
    # every class appears: the unconditional model covers the data
    labels = D.load_network("digits_classifier_cnn")(batch.images).argmax(1)
    assert torch.bincount(labels, minlength=10).min() >= 50


@pytest.mark.parametrize("kw", [dict(diffusion="none"), dict(diffusion="square"), dict(interpolant="vp")])
def test_flow_samples_are_recognisable_digits(kw):
    """>= 80% of 1,000 flow samples (Linear-ODE, Linear-SDE, VP-SDE; 50 steps) are confident digits."""
    model = DigitsFlow(num_steps=50, **kw).load()
    batch = BaseSampler().sample(model, None, [None] * 1000, torch.arange(1000), seed=0)
    conf = D.load_network("digits_classifier_cnn")(batch.images).softmax(-1).max(-1).values
    assert (conf >= 0.9).float().mean() >= 0.8


def test_conditional_model_draws_the_requested_class():
    model = DigitsDiffusion(conditional=True, num_steps=20).load()
    conds = [i % 10 for i in range(200)]
    batch = BaseSampler().sample(model, None, conds, torch.arange(200), seed=0)
    pred = D.load_network("digits_classifier_cnn")(batch.images).argmax(1)
    assert (pred == torch.tensor(conds)).float().mean() > 0.8


def test_recipe_makes_loadable_weights_and_a_report(tmp_path):
    from tsf.commands.pretrain import main

    main(["digits", "--out", str(tmp_path), "--denoiser_steps", "30", "--classifier_steps", "20"])
    report = json.loads((tmp_path / "digits.json").read_text())
    assert {"target_classifier", "holdout_classifier", "denoiser", "quality"} <= set(report)
    model = DigitsDiffusion(weights=str(tmp_path / "digits_denoiser.safetensors"), num_steps=5).load()
    assert model.net.inp.weight.abs().sum() > 0
    assert D.load_network(tmp_path / "digits_classifier_cnn.safetensors") is not None


def test_readme_records_the_shipped_numbers():
    report = json.loads((D.WEIGHTS_DIR / "digits.json").read_text())
    flow = json.loads((D.WEIGHTS_DIR / "digits_flow.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert report["command"] in readme and flow["command"] in readme
    for value in (report["target_classifier"]["test_accuracy"], report["holdout_classifier"]["test_accuracy"],
                  report["quality"]["base_confident_fraction"], flow["quality_linear_ode"]["base_confident_fraction"],
                  flow["quality_linear_sde"]["base_confident_fraction"], flow["quality_vp_sde"]["base_confident_fraction"]):
        assert f"{100 * value:.1f}%" in readme


def test_every_torch_load_is_weights_only():
    for path in (ROOT / "tsf").rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text, path
        for call in re.findall(r"torch\.load\(.*", text):  # the rest of the line
            assert "weights_only=True" in call, (path, call)
