import json
from pathlib import Path

import pytest
import torch

from tsf.commands.table import results_table


def test_results_table_has_a_row_per_run_and_every_cross_reward(tmp_path):
    for name, t in (("a", -3.5), ("b", -1.25)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"target/mean": t, "cross/digit_holdout/mean": t - 1, "compute/nfe": 400.0, "diversity/vendi": 8.61}))
    table = results_table([tmp_path / "a", tmp_path / "b"]).splitlines()
    assert table[0] == "| run | target mean | cross digit_holdout mean | vendi | NFE |"
    assert table[2] == "| a | -3.5 | -4.5 | 8.61 | 400 |"
    assert table[3].startswith("| b | -1.25 |")


def test_table_means_carry_standard_errors_from_the_samples(tmp_path, capsys):
    """A run with samples.pt: its target and cross-reward means carry their standard errors (the sample
    standard deviation over sqrt(n) of the per-sample rewards); a run without it keeps the bare mean; the
    rows take a config's ``label:`` and ``--labels``."""
    import yaml

    from tsf.commands.table import main as table

    rng = torch.Generator().manual_seed(0)
    target, cross = torch.randn(40, generator=rng) - 3, torch.randn(40, generator=rng) * 2
    a = tmp_path / "best_of_n_K8_digit_seed0"
    a.mkdir()
    torch.save({"sample_id": torch.arange(40), "rewards": {"digit": target, "digit_holdout": cross}}, a / "samples.pt")
    (a / "metrics.json").write_text(json.dumps({"target/mean": target.mean().item(),
                                                "cross/digit_holdout/mean": cross.mean().item(), "compute/nfe": 80.0}))
    b = tmp_path / "das_K8_digit_seed0"
    b.mkdir()
    (b / "metrics.json").write_text(json.dumps({"target/mean": -1.25, "cross/digit_holdout/mean": -2.0,
                                                "compute/nfe": 80.0}))
    (b / "config.yaml").write_text(yaml.safe_dump({"label": "DAS (ours)"}))
    table([str(a), str(b), "--labels", "best_of_n_K8_digit_seed0=Best-of-N"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| run | target mean ± s.e. | cross digit_holdout mean ± s.e. | NFE |"
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "Best-of-N" and all("±" in c for c in cells[1:3])
    for cell, values in zip(cells[1:3], (target, cross)):
        mean, se = map(float, cell.split("±"))
        assert mean == pytest.approx(values.double().mean().item(), abs=se / 10)
        assert se == pytest.approx((values.double().std() / 40 ** 0.5).item(), rel=0.05)
    assert lines[3] == "| DAS (ours) | -1.25 | -2 | 80 |"  # no samples.pt: no error to give


@pytest.mark.slow  # about a minute: runs several tsf sample processes
def test_compare_keeps_finished_runs_and_refuses_to_mix_in_another_config(tmp_path, capsys):
    """A second ``tsf compare`` of the same configs samples nothing again (the shards are not rewritten,
    the metrics are the same); a config file edited since its run is refused rather than mixed into the
    finished run; ``--overwrite`` runs it again."""
    import pytest
    import yaml

    from tsf.commands.compare import main as compare

    cfg = tmp_path / "best_of_n.yaml"
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/gmm/best_of_n.yaml").read_text())
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    extra = ["--wandb_mode=disabled", "--trainer.enable_progress_bar=false", "--model.init_args.fidelity_samples=20",
             "--data.init_args.num_samples=10"]

    def run(*own):
        compare([str(cfg), "--output_dir", str(out), *own, "--", *extra])

    run()
    (run_dir,) = [d for d in out.iterdir() if d.is_dir()]
    shards = {p: p.stat().st_mtime_ns for p in (run_dir / "shards").iterdir()}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run()
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "shards").iterdir()} == shards
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert f"| {run_dir.name} |" in capsys.readouterr().out  # the table, with the kept run

    config["model"]["init_args"]["base"]["init_args"]["num_steps"] = 7  # the file is edited: same run name
    cfg.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match="failed"):
        run()
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "shards").iterdir()} == shards
    run("--overwrite")
    assert json.loads((run_dir / "metrics.json").read_text())["compute/nfe"] != metrics["compute/nfe"]


def test_compare_passes_config_overrides_through_to_every_run(tmp_path):
    import yaml

    from tsf.cli import load_samples
    from tsf.commands.compare import main as compare, split_passthrough

    assert split_passthrough(["a.yaml", "--data.init_args.num_samples=50", "--trainer.devices", "2", "--overwrite",
                              "--", "--wandb_mode=disabled"]) == (
        ["a.yaml", "--overwrite"], ["--data.init_args.num_samples=50", "--trainer.devices", "2", "--wandb_mode=disabled"])
    cfg = Path(__file__).resolve().parents[1] / "configs/gmm/base.yaml"
    compare([str(cfg), "--output_dir", str(tmp_path), "--data.init_args.num_samples=7",
             "--model.init_args.fidelity_samples=0", "--", "--wandb_mode=disabled", "--trainer.enable_progress_bar=false"])
    (run_dir,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert len(load_samples(run_dir)["sample_id"]) == 7
    assert run_dir.name.endswith("_fidelity_samples=0_num_samples=7")  # the overrides are in the run's name
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["init_args"]["num_samples"] == 7
