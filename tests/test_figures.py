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
    """Axes that name the reward, replicates as one point (no zigzag), a compute axis with backward
    passes, and no trivial one-particle SMC diagnostics."""
    import shutil

    from tsf.commands.figures import Run, metric_label, series, smc_figure, style

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


# ----------------------------------------------------------------------------- figures a reviewer reads (issue 24)
def numbers_run(root: Path, name: str, metrics: dict, config: dict = None) -> Path:
    """A run directory of numbers only: ``metrics.json`` (and a ``config.yaml``), as `tsf sample` writes them."""
    import yaml

    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    if config is not None:
        (d / "config.yaml").write_text(yaml.safe_dump(config))
    return d


def smc_config(adapter=None, **top) -> dict:
    return {"model": {"class_path": "tsf.lightning.SamplingModule", "init_args": {
        "sampler": {"class_path": "tsf.samplers.SMC", "init_args": {"num_particles": 4, "alpha": 0.1}},
        "base": {"class_path": "tsf.models.DigitsDiffusion", "init_args": {"adapter": adapter}}}}, **top}


def legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_legend_labels_are_short_and_can_be_given(tmp_path):
    """Default labels name an adapter by its run (not its whole path); ``--labels`` (pairs, JSON, a file)
    and a ``label:`` in a run's config.yaml replace them, and runs given one label are one curve."""
    import matplotlib.pyplot as plt

    from tsf.commands.figures import main as figures_main, method_styles, parse_labels, relabel

    m = {"target/mean": -1.0, "cross/digit_holdout/mean": -2.0, "compute/nfe": 400.0}
    tuned = numbers_run(tmp_path / "a", "das_k4_K4_digit_seed0", m,
                        smc_config("runs/overopt/finetune_draft_val_samples=50/adapter"))
    plain = numbers_run(tmp_path / "b", "das_k4_K4_digit_seed0", {**m, "target/mean": -3.0}, smc_config())
    own = numbers_run(tmp_path, "smc_K4_digit_seed0", {**m, "target/mean": -2.0}, smc_config(label="SMC (ours)"))
    b16 = numbers_run(tmp_path, "best_of_n_nfe16", {**m, "compute/nfe": 16.0})
    b32 = numbers_run(tmp_path, "best_of_n_nfe32", {**m, "compute/nfe": 32.0})
    runs = load_runs([tuned, plain, own, b16, b32])
    assert sorted({r.label for r in runs}) == ["SMC (ours)", "best_of_n", "das_k4 (adapter=draft)",
                                               "das_k4 (adapter=none)"]
    with style():
        fig = build("scaling", runs, method_styles(r.label for r in runs), {}, 4, print)
        assert sorted(legend_texts(fig)) == sorted({r.label for r in runs})
        plt.close(fig)

    # two adapters of one run name in two folders are still told apart
    from tsf.identity import distinguishing_labels

    same = distinguishing_labels(["das", "das"], [{"adapter": "a/finetune_draft/adapter"},
                                                  {"adapter": "b/finetune_draft/adapter"}])
    assert len(set(same)) == 2, same

    # a method's name keeps its variants apart; a directory's name or path picks one run
    labels = parse_labels(["das_k4=DAS", f"{b16}=Best-of-N", "best_of_n_nfe32=Best-of-N"])
    runs = relabel(load_runs([tuned, plain, own, b16, b32]), labels)
    assert sorted({r.label for r in runs}) == ["Best-of-N", "DAS (adapter=draft)", "DAS (adapter=none)", "SMC (ours)"]
    # from the command line: pairs, a JSON object, a YAML file; a key that names no run is one line
    (tmp_path / "labels.yaml").write_text("smc_K4_digit_seed0: SMC\nbest_of_n: BoN\n")
    for given in (["smc_K4_digit_seed0=SMC", "best_of_n=BoN"], ['{"smc_K4_digit_seed0": "SMC", "best_of_n": "BoN"}'],
                  [str(tmp_path / "labels.yaml")]):
        out = tmp_path / f"out{len(given)}{given[0][0]}"
        figures_main([str(own), str(b16), str(b32), "--out", str(out), "--only", "scaling", "--formats", "png",
                      "--labels", *given])
        assert (out / "scaling.png").is_file()
    assert parse_labels(["svdd_pm_alpha=1.0=SVDD (a=1)"], ["svdd_pm_alpha=1.0"]) == {"svdd_pm_alpha=1.0": "SVDD (a=1)"}
    with pytest.raises(SystemExit, match="--labels: 'nope' names no run"):
        figures_main([str(own), "--out", str(tmp_path / "x"), "--labels", "nope=X"])


def lab(color) -> np.ndarray:
    """sRGB -> CIELAB (D65), to judge how far apart two colours look (CIE76 delta E)."""
    from matplotlib.colors import to_rgb

    rgb = np.array(to_rgb(color))
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ lin
    f = lambda t: np.where(t > 216 / 24389, np.cbrt(t), (24389 / 27 * t + 16) / 116)  # noqa: E731
    fx, fy, fz = f(xyz / np.array([0.95047, 1.0, 1.08883]))
    return np.array([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)])


def test_nearby_methods_get_colours_and_markers_far_apart():
    from itertools import combinations

    from tsf.commands.figures import method_styles

    # the digits flow figure's methods (ode_bon, sde_bon and smc_linear were three shades of one blue)
    methods = ["base", "das_vp", "ode_bon", "rbf_linear", "rbf_vp", "sde_bon", "smc_linear", "svdd_linear", "svdd_vp",
               "my_method"]
    styles = method_styles(methods)
    for a, b in combinations(methods, 2):
        assert np.linalg.norm(lab(styles[a].color) - lab(styles[b].color)) > 25, (a, b, styles[a], styles[b])
    assert len({s.marker for s in styles.values()}) == len(methods)  # a marker each
    assert method_styles(methods) == styles  # one set of labels, one look
    # past ten methods colours repeat, but never with the same marker
    many = method_styles([f"m{i}" for i in range(30)])
    assert len(set(many.values())) == 30
    # a user's label keeps its method's look
    renamed = method_styles(["Best-of-N"], {"Best-of-N": "best_of_n"})["Best-of-N"]
    assert renamed == method_styles(["best_of_n"])["best_of_n"]


def artist_markers(fig) -> dict[str, set]:
    from matplotlib.lines import Line2D

    found: dict[str, set] = {}
    for a in fig.findobj(lambda a: isinstance(a, Line2D) and a.get_gid() is not None and a.get_marker() not in
                         ("None", "", "|", "_")):
        found.setdefault(a.get_gid(), set()).add(a.get_marker())
    return found


def test_a_method_keeps_its_marker_in_every_figure(run_dirs):
    import matplotlib.pyplot as plt

    from tsf.commands.figures import method_styles

    runs = load_runs(run_dirs.values())
    styles = method_styles(r.label for r in runs)
    seen: dict[str, set] = {}
    with style():
        for name in FIGURES:
            fig = build(name, runs, styles, {}, 6, print)
            for label, markers in artist_markers(fig).items():
                seen.setdefault(label, set()).update(markers)
            plt.close(fig)
    assert set(seen) == set(styles)
    for label, markers in seen.items():
        assert markers == {styles[label].marker}, (label, markers)


def marker_points(ax) -> np.ndarray:
    """Display coordinates and radius (pixels) of every marker drawn in ``ax``."""
    px = ax.figure.dpi / 72
    rows = []
    for ln in ax.lines:
        if ln.get_marker() in (None, "None", "none", ""):
            continue
        for x, y in ln.get_transform().transform(ln.get_xydata()):
            rows.append((x, y, ln.get_markersize() / 2 * px))
    return np.array(rows).reshape(-1, 3)


def overopt_runs(root: Path) -> list[Path]:
    """The over-optimisation figure's crowded corner: DRaFT's curve ends among the samplers' points."""
    def m(t, c, d):
        return {"target/mean": t, "cross/digit_holdout/mean": c, "diversity/pairwise": d, "compute/nfe": 400.0}

    dirs = [numbers_run(root, "base_K1_digit_seed0", m(-10.2, -11.6, 0.66)),
            numbers_run(root, "svdd_pm_K4_digit_seed0", m(0.05, 0.15, 0.20)),
            numbers_run(root, "das_k4_K4_digit_seed0", m(0.3, 0.1, 0.185)),
            numbers_run(root, "best_of_n_K4_digit_seed0", m(-1.2, -3.1, 0.41))]
    for name, end in (("finetune_draft", 0.0), ("finetune_ddpo", -3.1)):
        d = root / name
        d.mkdir()
        rows = [{"step": s, "target/mean": end - 1 + s / 300, "cross/digit_holdout/mean": end - 1 + s / 300,
                 "diversity/pairwise": 0.48 - s / 1000} for s in (0, 100, 200, 300)]
        (d / "val_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(d)
    return dirs


def test_end_labels_do_not_sit_on_the_points(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.text import Annotation

    from tsf.commands.figures import method_styles, place_end_labels

    runs = load_runs(overopt_runs(tmp_path))
    with style():
        for name in ("overoptimisation", "frontier", "diversity"):
            fig = build(name, runs, method_styles(r.label for r in runs), {}, 4, print)
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            checked = 0
            for ax in fig.axes:
                points = marker_points(ax)
                boxes = []
                for ann in (t for t in ax.texts if isinstance(t, Annotation)):
                    box = ann.get_window_extent(renderer)
                    inside = ((points[:, 0] > box.x0 - points[:, 2]) & (points[:, 0] < box.x1 + points[:, 2])
                              & (points[:, 1] > box.y0 - points[:, 2]) & (points[:, 1] < box.y1 + points[:, 2]))
                    assert not inside.any(), (name, ann.get_text(), points[inside])
                    assert ax.get_window_extent(renderer).contains(box.x0, box.y0)
                    assert not any(box.overlaps(b) for b in boxes)
                    boxes.append(box)
                    checked += 1
            assert checked == (4 if name == "overoptimisation" else 2)  # "step 300" of each curve, in each panel
            plt.close(fig)
    # where the labels were drawn before (2 points above and right of the curve's end), they cover points
    with style():
        fig = build("frontier", runs, method_styles(r.label for r in runs), {}, 4, print)
        ax = fig.axes[0]
        for ann in (t for t in ax.texts if isinstance(t, Annotation)):
            ann.xyann = (2, 2)
            ann.set_ha("left")
            ann.set_va("baseline")
        fig.canvas.draw()
        points = marker_points(ax)
        covered = 0
        for ann in (t for t in ax.texts if isinstance(t, Annotation)):
            box = ann.get_window_extent(fig.canvas.get_renderer())
            covered += int(((points[:, 0] > box.x0 - points[:, 2]) & (points[:, 0] < box.x1 + points[:, 2])
                            & (points[:, 1] > box.y0 - points[:, 2]) & (points[:, 1] < box.y1 + points[:, 2])).any())
        assert covered  # so the test above checks something
        place_end_labels(ax, fig.canvas.get_renderer())
        plt.close(fig)


def test_every_nfe_has_a_tick_label_and_a_curve_under_another_shows(run_dirs, tmp_path):
    """A point at 37 NFE gets its own labelled tick even beside 46 and 50 (labels too close for one row are
    staggered, none overlapping), and Best-of-N drawn under DAS at the very same values still shows."""
    import shutil

    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from tsf.commands.figures import method_styles

    dirs = [run_dirs["bon2"], run_dirs["bon4"]]
    for d in list(dirs):  # DAS with Best-of-N's numbers: the same curve
        dirs.append(tmp_path / d.name.replace("best_of_n", "das"))
        shutil.copytree(d, dirs[-1])
    m = {"target/mean": -3.0, "cross/digit_holdout/mean": -4.0, "diversity/pairwise": 0.6}
    for nfe, t in ((37.0, -4.0), (46.0, -3.5), (50.0, -3.0), (500.0, -1.0)):
        dirs.append(numbers_run(tmp_path, f"svdd_pm_nfe{nfe:.0f}", {**m, "target/mean": t, "compute/nfe": nfe}))
    runs = load_runs(dirs)
    with style():
        fig = build("scaling", runs, method_styles(r.label for r in runs), {}, 4, print)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            ticks = [t for t in ax.xaxis.get_major_ticks() if t.label1.get_visible() and t.label1.get_text()]
            texts = {t.label1.get_text() for t in ticks}
            assert {"16", "32", "37", "46", "50", "500"} <= texts, texts
            boxes = [t.label1.get_window_extent(renderer) for t in ticks]
            for i, a in enumerate(boxes):
                assert not any(a.overlaps(b) for b in boxes[i + 1:])
            lines = {ln.get_gid(): ln for ln in ax.lines
                     if isinstance(ln, Line2D) and ln.get_gid() in ("best_of_n", "das") and len(ln.get_xdata()) == 2}
            under, over = lines["best_of_n"], lines["das"]
            np.testing.assert_array_equal(under.get_ydata(), over.get_ydata())  # the values are not moved
            assert over.get_zorder() > under.get_zorder()
            assert over.get_markerfacecolor() == "none" and over.get_markersize() > under.get_markersize()
            assert over.get_linestyle() != under.get_linestyle() == "-"  # dashed: the line beneath shows between
        plt.close(fig)


def test_grid_columns_show_the_conditions(run_dirs, tmp_path):
    import shutil

    import matplotlib.pyplot as plt
    import yaml

    from tsf.commands.figures import method_styles

    runs = load_runs([run_dirs["bon4"], run_dirs["smc"]])
    with style():
        fig = build("grids", runs, method_styles(r.label for r in runs), {}, 4, print)
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["class 0", "class 1", "class 2", "class 3"]
        plt.close(fig)
    # prompts: each column is headed by its prompt, wrapped to the column
    prompts = ["a red apple on a wooden table in the morning light", "a photo of a cat"]
    copies = []
    for d in (run_dirs["bon4"], run_dirs["smc"]):
        copies.append(tmp_path / d.name)
        shutil.copytree(d, copies[-1])
        config = yaml.safe_load((copies[-1] / "config.yaml").read_text())
        config["data"]["init_args"]["conditions"] = prompts
        (copies[-1] / "config.yaml").write_text(yaml.safe_dump(config))
    runs = load_runs(copies)
    with style():
        fig = build("grids", runs, method_styles(r.label for r in runs), {}, 8, print)
        labels = fig.axes[0].get_xticklabels()
        assert [t.get_text().replace("\n", " ") for t in labels] == [prompts[i % 2] for i in range(8)]
        assert "\n" in labels[0].get_text()  # wrapped: the headings stay within their columns
        fig.canvas.draw()
        boxes = [t.get_window_extent(fig.canvas.get_renderer()) for t in labels]
        assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))
        plt.close(fig)


def test_bootstrap_ci_is_scipys_percentile_bootstrap_and_equals_the_hand_written_one_it_replaced():
    """``bootstrap_ci`` calls ``scipy.stats.bootstrap``; with the same seed it gives exactly the interval of the
    resampling it replaced (draw ``n`` indices per resample, mean, percentiles), to rounding."""
    from scipy.stats import bootstrap

    for n, level, seed in ((2, 0.95, 0), (37, 0.9, 3), (500, 0.95, 1)):
        x = np.random.default_rng(n).standard_t(3, size=n)
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, n, size=(400, n))].mean(1)
        tail = 100 * (1 - level) / 2
        assert bootstrap_ci(x, 400, level, seed) == pytest.approx(tuple(np.percentile(means, [tail, 100 - tail])),
                                                                 rel=1e-12, abs=1e-12)
        ci = bootstrap((x,), np.mean, n_resamples=400, confidence_level=level, method="percentile",
                       rng=np.random.default_rng(seed)).confidence_interval
        assert bootstrap_ci(x, 400, level, seed) == (ci.low, ci.high)
    assert bootstrap_ci([0.5]) == (0.5, 0.5)
