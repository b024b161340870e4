"""Every shipped config validates; the mixture's configs run end to end through the CLI."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from tsf.cli import load_samples, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_validates(path, capsys):
    model = yaml.safe_load(path.read_text())["model"]["class_path"]
    command = "fit" if model.startswith("baselines.") or model.endswith("ValueModule") else "sample"
    with pytest.raises(SystemExit) as e:
        main([command, "--config", str(path), "--print_config"])
    assert e.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted([*(ROOT / "configs/gmm").glob("*.yaml"), *(ROOT / "configs/gmm_flow").glob("*.yaml")]),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_mixture_configs_run(path, tmp_path):
    main(["sample", "--config", str(path), f"--output_dir={tmp_path}", "--data.init_args.num_samples=20",
          "--model.init_args.fidelity_samples=50", "--model.init_args.base.init_args.num_steps=10",
          "--wandb_mode=disabled", "--trainer.enable_progress_bar=false"])
    (run,) = tmp_path.iterdir()
    assert run.name.startswith(path.stem + "_K")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["compute/nfe"] > 0 and "target/mean" in metrics
    s = load_samples(run)
    assert s["x0"].shape == (20, 2) and "images" not in s


@pytest.mark.parametrize("path", sorted((ROOT / "configs/discrete_mixture").glob("*.yaml")), ids=lambda p: p.stem)
def test_discrete_mixture_configs_run(path, tmp_path):
    main(["sample", "--config", str(path), f"--output_dir={tmp_path}", "--data.init_args.num_samples=20",
          "--wandb_mode=disabled", "--trainer.enable_progress_bar=false"])
    (run,) = tmp_path.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["compute/nfe"] > 0 and "target/mean" in metrics and 0 < metrics["diversity/hamming"] < 1
    s = load_samples(run)
    assert s["x0"].dtype.is_floating_point is False and s["x0"].shape == (20, 4)  # integer tokens [N, L]


MASKED_FAST = ("base", "svdd_pm")


@pytest.mark.parametrize("path", [pytest.param(p, marks=() if p.stem in MASKED_FAST else pytest.mark.slow, id=p.stem)
                                  for p in sorted((ROOT / "configs/digits_masked").glob("*.yaml"))
                                  if p.stem not in ("value", "svdd_mc")])
def test_digits_masked_configs_run(path, tmp_path):
    main(["sample", "--config", str(path), f"--output_dir={tmp_path}", "--data.init_args.num_samples=10",
          "--data.init_args.batch_size=10", "--model.init_args.fidelity_samples=50",
          "--model.init_args.base.init_args.num_steps=8", "--wandb_mode=disabled", "--trainer.enable_progress_bar=false"])
    (run,) = tmp_path.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["compute/nfe"] >= 8 and "fidelity/fd" in metrics and "cross/digit_holdout/mean" in metrics
    s = load_samples(run)
    assert s["x0"].dtype == torch.long and s["x0"].shape == (10, 64) and s["images"].shape == (10, 1, 8, 8)


@pytest.mark.slow
def test_digits_masked_svdd_mc_runs_on_its_fitted_value(tmp_path):
    root = tmp_path / "value"
    main(["fit", "--config", str(ROOT / "configs/digits_masked/value.yaml"), "--model.init_args.num_rollouts=64",
          "--model.init_args.batch_size=64", "--model.init_args.base.init_args.num_steps=8", "--trainer.max_epochs=1",
          f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false", "--trainer.logger=false"])
    checkpoint = root / "value.safetensors"
    assert checkpoint.is_file()
    main(["sample", "--config", str(ROOT / "configs/digits_masked/svdd_mc.yaml"), f"--output_dir={tmp_path / 'runs'}",
          f"--model.init_args.sampler.init_args.value.init_args.checkpoint={checkpoint}",
          "--data.init_args.num_samples=10", "--data.init_args.batch_size=10", "--model.init_args.fidelity_samples=0",
          "--model.init_args.base.init_args.num_steps=8", "--wandb_mode=disabled", "--trainer.enable_progress_bar=false"])
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "metrics.json").read_text())["compute/nfe"] == 8


@pytest.mark.parametrize("module", ["tsf.rewards", "tsf.samplers", "tsf.models", "tsf.evaluation", "tsf.lightning",
                                    "tsf.cli", "tsf.rewards.linear", "tsf.samplers.value", "tsf.models.gmm", "tsf.models.masked",
                                    "tsf.rewards.tokens"])
def test_every_module_imports_on_its_own(module):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-500:]
