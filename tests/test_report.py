import json
from pathlib import Path

import torch

from tsf.report import results_table


def test_results_table_has_a_row_per_run_and_every_cross_reward(tmp_path):
    for name, t in (("a", -3.5), ("b", -1.25)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"target/mean": t, "cross/digit_holdout/mean": t - 1, "compute/nfe": 400.0, "diversity/vendi": 8.61}))
    table = results_table([tmp_path / "a", tmp_path / "b"]).splitlines()
    assert table[0] == "| run | target mean | cross digit_holdout mean | vendi | NFE |"
    assert table[2] == "| a | -3.5 | -4.5 | 8.61 | 400 |"
    assert table[3].startswith("| b | -1.25 |")


def test_compare_keeps_finished_runs_and_refuses_to_mix_in_another_config(tmp_path, capsys):
    """A second ``tsf compare`` of the same configs samples nothing again (the shards are not rewritten,
    the metrics are the same); changing the data is refused rather than mixed into the finished run;
    ``--overwrite`` runs it again."""
    import pytest

    from tsf.report import compare

    root = Path(__file__).resolve().parents[1] / "configs/gmm"
    extra = ["--wandb_mode=disabled", "--trainer.enable_progress_bar=false", "--model.init_args.fidelity_samples=20"]

    def run(*args):
        own = [a for a in args[:1] if a]
        compare([str(root / "best_of_n.yaml"), "--output_dir", str(tmp_path), *own, "--", *extra, *args[1:]])

    run("", "--data.init_args.num_samples=10")
    (run_dir,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    shards = {p: p.stat().st_mtime_ns for p in (run_dir / "shards").iterdir()}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run("", "--data.init_args.num_samples=10")
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "shards").iterdir()} == shards
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert "| best_of_n_K" in capsys.readouterr().out  # the table, with the kept run

    with pytest.raises(SystemExit, match="failed"):
        run("", "--data.init_args.num_samples=12")
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "shards").iterdir()} == shards
    run("--overwrite", "--data.init_args.num_samples=12")
    assert len(torch.load(run_dir / "samples.pt", weights_only=True)["sample_id"]) == 12
