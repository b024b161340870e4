"""`tsf figures` on real (tiny) run directories: every figure, bootstrap bands, one colour per method,
skipped figures for missing inputs, and the SMC diagnostics that the sampling module writes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tsf.cli import load_samples, main
from tsf.commands.figures import (FIGURES, bootstrap_ci, build, load_runs, method_colors, method_label, scaling_series,
                         style)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--data.init_args.num_samples=20", "--data.init_args.batch_size=8", "--model.init_args.fidelity_samples=32",
         "--model.init_args.base.init_args.num_steps=8", "--trainer.enable_progress_bar=false",
         "--wandb_mode=disabled"]


def sample(out: Path, config: str, name: str, *extra: str) -> Path:
    main(["sample", "--config", str(ROOT / "configs" / config), *SMALL, f"--output_dir={out}", f"--run_name={name}",
          *extra])
    return out / name


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """Best-of-N at two budgets (a curve), SMC at one (a point, with diagnostics), a GMM SMC run (no images,
    no cross-reward) and a fine-tuning curve (val_metrics.jsonl, as `tsf finetune` writes it)."""
    out = tmp_path_factory.mktemp("runs")
    k = "--model.init_args.sampler.init_args.num_particles"
    dirs = {
        "bon2": sample(out, "digits/best_of_n.yaml", "best_of_n_nfe16", f"{k}=2"),
        "bon4": sample(out, "digits/best_of_n.yaml", "best_of_n_nfe32", f"{k}=4"),
        "smc": sample(out, "digits/smc.yaml", "smc_K4_digit_seed0", f"{k}=4"),
        "gmm": sample(out, "gmm/smc.yaml", "smc_gmm", f"{k}=8"),
    }
    tune = out / "finetune_draft"
    tune.mkdir()
    rows = [{"step": s, "target/mean": -8 + s / 10, "cross/digit_holdout/mean": -7 + s / 20,
             "diversity/pairwise": 0.66 - s / 1000} for s in (0, 25, 50)]
    (tune / "val_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dirs["draft"] = tune
    return dirs


def test_figures_command_writes_every_figure_as_png_and_pdf(run_dirs, tmp_path, capsys):
    main(["figures", *map(str, run_dirs.values()), str(run_dirs["smc"] / "samples.pt"), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for name in FIGURES:
        for ext in ("png", "pdf"):
            path = tmp_path / f"{name}.{ext}"
            assert path.stat().st_size > 1000, path
            assert str(path) in printed  # the list of files written
    assert "skipped" not in printed


def test_bootstrap_band_contains_the_mean_and_shrinks_with_more_samples(run_dirs):
    runs = load_runs([run_dirs["bon2"], run_dirs["bon4"], run_dirs["smc"]])
    curves = scaling_series(runs, ci={"num_resamples": 1000, "seed": 0})
    bon = curves["best_of_n"]
    assert bon.x.tolist() == [16.0, 32.0]  # NFE per sample, in order: one curve over the budgets
    for r, lo, y, hi in zip(sorted(runs[:2], key=lambda r: r.nfe), bon.y_lo, bon.y, bon.y_hi):
        rewards = load_samples(r.path)["rewards"]["digit"].double()
        assert y == pytest.approx(rewards.mean().item(), abs=1e-5)  # the metric is the per-sample mean
        assert lo < y < hi
    assert len(curves["smc"].x) == 1  # a single run: a point
    # reproducible (fixed seed), and a 100x larger sample gives a band about 10x narrower
    values = np.random.default_rng(1).normal(size=20_000)
    assert bootstrap_ci(values[:200]) == bootstrap_ci(values[:200])
    small, large = (np.subtract(*bootstrap_ci(values[:n]))[()] for n in (200, 20_000))
    assert 6 < small / large < 14


def artist_colours(fig) -> dict[str, set]:
    """Method label -> the RGB colours of every artist drawn for it (artists carry the label as gid)."""
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import to_rgb

    found: dict[str, set] = {}
    for a in fig.findobj(lambda a: a.get_gid() is not None):
        c = a.get_facecolor() if isinstance(a, PolyCollection) else a.get_color()  # bands; lines, bars, labels
        c = c[0] if np.ndim(c) == 2 else c
        found.setdefault(a.get_gid(), set()).add(tuple(round(float(v), 4) for v in to_rgb(c)))
    return found


def test_a_method_has_one_colour_in_every_figure(run_dirs):
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    runs = load_runs(run_dirs.values())
    colors = method_colors(r.label for r in runs)
    assert len(set(colors.values())) == len(colors) == 4  # best_of_n, smc, smc_gmm, draft
    seen: dict[str, set] = {}
    with style():
        for name in FIGURES:
            fig = build(name, runs, colors, {}, 6, print)
            for label, rgb in artist_colours(fig).items():
                seen.setdefault(label, set()).update(rgb)
            if name == "scaling":  # a curve has a band, a one-run method only error bars
                bands = {a.get_gid() for a in fig.findobj(PolyCollection)}
                assert "best_of_n" in bands and "smc" not in bands
            plt.close(fig)
    assert set(seen) == set(colors)  # every method is drawn somewhere ...
    for label, rgb in seen.items():
        assert len(rgb) == 1, (label, rgb)  # ... in exactly one colour
    # the shared mapping is stable: `tsf scaling` and `tsf overopt` get the same colour for a known method
    assert method_colors(["best_of_n"])["best_of_n"] == colors["best_of_n"]


def test_missing_inputs_skip_their_figures_with_a_note(run_dirs, tmp_path, capsys):
    main(["figures", str(run_dirs["gmm"]), "--out", str(tmp_path), "--prefix", "gmm_"])
    printed = capsys.readouterr().out
    assert "note: frontier skipped: no run has a cross-reward" in printed
    assert "note: grids skipped: no run has images" in printed
    assert {p.name for p in tmp_path.iterdir()} == {f"gmm_{n}.{e}" for n in ("scaling", "diversity", "smc_diagnostics")
                                                    for e in ("png", "pdf")}
    main(["figures", str(run_dirs["bon2"]), "--out", str(tmp_path / "bon")])
    assert "note: smc_diagnostics skipped: no run has diagnostics.pt" in capsys.readouterr().out


def test_smc_run_writes_its_diagnostics_sorted_by_sample_id(run_dirs):
    from tsf.models import DigitsDiffusion
    from tsf.rewards import build_reward
    from tsf.samplers import SMC

    d = torch.load(run_dirs["smc"] / "diagnostics.pt", weights_only=True)
    assert d["sample_id"].tolist() == list(range(20))  # sorted, every id once
    ess, flags = d["ess_fraction"], d["resampled"]
    assert ess.shape == flags.shape == (20, 8) and flags.dtype == torch.bool
    assert (ess > 0).all() and (ess <= 1 + 1e-6).all()
    assert flags.any() and not flags[:, -1].any()  # resampled at some steps, never after the last
    assert not (run_dirs["bon2"] / "diagnostics.pt").exists()  # Best-of-N has none
    # rows are aligned with sample ids: sampling ids 9..11 alone gives rows 9..11 (seed 0, class i % 10)
    ids = [9, 10, 11]
    out = SMC(num_particles=4, alpha=0.1).sample(DigitsDiffusion(num_steps=8, eta=1.0, conditional=False),
                                                 build_reward("digit"), [i % 10 for i in ids], ids, seed=0)
    torch.testing.assert_close(out.diagnostics["ess_fraction"], ess[ids])
    assert torch.equal(out.diagnostics["resampled"], flags[ids])
    assert torch.equal(out.diagnostics["ess_fraction"], out.diagnostics["ess"] / 4)


def test_method_labels_from_run_directory_names():
    assert method_label(Path("runs/svdd_vp_nfe200")) == "svdd_vp"
    assert method_label(Path("runs/overopt/das_k4_K4_digit_seed0")) == "das_k4"
    assert method_label(Path("runs/smc_K16_digit_seed0_ab12cd")) == "smc"  # a sweep run
    assert method_label(Path("runs/finetune_draft")) == "draft"


@pytest.mark.slow
def test_two_processes_write_the_one_process_diagnostics(tmp_path):
    def run(name, *extra):
        cmd = [sys.executable, "-m", "tsf.cli", "sample", "--config", str(ROOT / "configs/digits/das.yaml"),
               "--data.init_args.num_samples=23", "--data.init_args.batch_size=5",
               "--model.init_args.fidelity_samples=32", "--model.init_args.base.init_args.num_steps=6",
               "--wandb_mode=disabled", "--trainer.enable_progress_bar=false", f"--output_dir={tmp_path}",
               f"--run_name={name}", *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        return torch.load(tmp_path / name / "diagnostics.pt", weights_only=True)

    one = run("one")
    two = run("two", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")
    assert two["sample_id"].tolist() == list(range(23))
    for k in one:
        assert torch.equal(one[k], two[k]), k


class FakeWandbRun:
    def __init__(self, name, summary, history=(), config=None):
        self.name, self.summary, self._history, self.config = name, summary, list(history), config or {}

    def history(self, pandas=False):
        return self._history


class FakeApi:
    def __init__(self, runs):
        self._runs = runs

    def runs(self, project):
        if project != "lab/tsf":
            raise ValueError(f"project {project} not found")
        return self._runs


def test_runs_of_a_wandb_project_are_drawn_from_their_metrics(run_dirs, tmp_path, monkeypatch, capsys):
    import wandb

    from tsf.commands.figures import main as figures_main

    m = {"target/mean": 0.4, "cross/digit_holdout/mean": 0.3, "diversity/pairwise": 1.1, "compute/nfe": 400.0}
    fake = FakeApi([
        FakeWandbRun("das_K8_digit_seed0", {**m, "_step": 3},
                     config={"model": {"init_args": {"sampler": {"class_path": "tsf.samplers.SMC"}}}}),
        FakeWandbRun("das_K16_digit_seed0", {**m, "target/mean": 0.5, "compute/nfe": 800.0}),
        FakeWandbRun("finetune_ddpo", {"val/target/mean": 0.2},
                     [{"_step": 50, "val/target/mean": 0.1, "val/cross/digit_holdout/mean": 0.0,
                       "val/diversity/pairwise": 1.0}, {"_step": 60, "train/loss": 1.0},
                      {"_step": 100, "val/target/mean": 0.2, "val/cross/digit_holdout/mean": 0.05,
                       "val/diversity/pairwise": 0.9}]),
        FakeWandbRun("crashed", {"_runtime": 3}),
    ])
    monkeypatch.setattr(wandb, "Api", lambda **kw: fake)
    figures_main([str(run_dirs["bon2"]), "--wandb_project", "lab/tsf", "--out", str(tmp_path), "--only",
                  "scaling", "frontier", "--formats", "png"])
    out = capsys.readouterr().out
    assert "wandb run 'crashed' has no target/mean" in out
    assert "4 runs, 3 methods" in out  # best_of_n (dir), das (2 wandb runs, one without its config), ddpo
    assert (tmp_path / "scaling.png").is_file() and (tmp_path / "frontier.png").is_file()
    from tsf.commands.figures import wandb_runs

    runs = {(r.label, r.nfe): r for r in wandb_runs("lab/tsf", api=fake, note=lambda s: None)}
    ddpo = next(r for (label, _), r in runs.items() if label == "ddpo")
    assert [row["step"] for row in ddpo.curve] == [50, 100] and ddpo.is_finetune
    das = runs[("das", 400.0)]
    assert das.sampler == "SMC" and das.samples is None  # numbers only: no bands, no grids
    with pytest.raises(SystemExit, match="cannot read the wandb project 'lab/other'"):
        figures_main(["--wandb_project", "lab/other", "--out", str(tmp_path)])


def test_the_sampler_is_read_from_a_nested_or_a_flattened_config():
    from tsf.commands.figures import _sampler_name

    nested = {"model": {"init_args": {"sampler": {"class_path": "tsf.samplers.SMC"}}}}
    assert _sampler_name(nested) == _sampler_name({"model.init_args.sampler.class_path": "tsf.samplers.SMC"}) == "SMC"
    assert _sampler_name({}) == "?"


def test_figure_axes_a_reviewer_accepts(run_dirs, tmp_path):
    """Ticks that do not overlap, axes that name the reward, replicates as one point (no zigzag), a
    compute axis with backward passes, and no trivial one-particle SMC diagnostics."""
    import shutil

    from tsf.commands.figures import Run, metric_label, series, smc_figure, style, thinned

    assert thinned([99, 100, 160, 170, 500]) == [100, 170, 500]  # never two ticks within 40%: the roundest
    assert thinned([38, 46, 50, 84, 92, 100, 186, 199, 200, 488, 496, 500]) == [50, 100, 200, 500]
    runs = load_runs([run_dirs["bon2"], run_dirs["bon4"]])
    assert metric_label("target/mean", runs) == "target reward: digit (mean)"
    assert metric_label("cross/digit_holdout/mean") == "cross-reward: digit_holdout (mean)"

    # a replicate of the NFE-16 run (another seed): the curve has one point per budget, over the pooled samples
    twin = tmp_path / "best_of_n_nfe16_seed1"
    shutil.copytree(run_dirs["bon2"], twin)
    runs = load_runs([run_dirs["bon2"], run_dirs["bon4"], twin])
    curve = series(runs, "compute/nfe", "target/mean")
    assert curve.x.tolist() == [16.0, 32.0]
    pooled = np.concatenate([r.per_sample("target/mean") for r in runs if r.nfe == 16])
    assert curve.y[0] == pytest.approx(pooled.mean())

    das = Run(None, "das", "SMC", {"target/mean": 1.0, "compute/nfe": 200.0, "compute/nfe_grad": 200.0})
    assert das.cost("compute/nfe_total") == 400.0 and das.cost("compute/nfe") == 200.0

    one = Run(run_dirs["smc"], "smc_k1", "SMC", {"target/mean": 0.0, "compute/nfe": 10.0},
              settings={"model.init_args.sampler.init_args.num_particles": 1})
    with style(), pytest.raises(Exception, match="more than one particle"):
        smc_figure([one], {"smc_k1": "k"})


def test_the_scaling_figure_draws_against_backward_passes_and_seconds(run_dirs, tmp_path, capsys):
    for x in ("nfe_total", "seconds"):
        main(["figures", str(run_dirs["bon2"]), str(run_dirs["bon4"]), "--out", str(tmp_path / x), "--only", "scaling",
              "--x", x])
        assert (tmp_path / x / "scaling.png").stat().st_size > 1000
