"""Every shipped config validates; the mixture's configs run end to end through the CLI."""

import json
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("module", ["tsf.rewards", "tsf.samplers", "tsf.models", "tsf.evaluation", "tsf.lightning",
                                    "tsf.cli", "tsf.rewards.linear", "tsf.samplers.value", "tsf.models.gmm", "tsf.models.masked",
                                    "tsf.rewards.tokens"])
def test_every_module_imports_on_its_own(module):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-500:]
