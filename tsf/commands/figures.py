"""Paper figures from run directories.

``tsf figures RUN_DIRS... --out DIR``: the paper's figures, PDF and PNG each, from the run directories
that ``tsf sample``, ``tsf compare`` and ``tsf scaling`` write (and the ``val_metrics.jsonl`` curves of
``tsf finetune``): reward against NFE (scaling curves with bootstrap confidence bands), target against
cross-reward (the over-optimisation frontier), diversity against target (and both side by side), sample
grids of every method on the same sample ids, and SMC diagnostics (ESS and resampling over the steps).
One colour per method in every figure; sizes for a two-column paper.

``tsf overopt`` (:mod:`tsf.commands.overopt`) draws the over-optimisation figure with them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import yaml

from tsf.errors import ConfigError
from tsf.identity import distinguishing_labels, flatten_config, method_identity, short_value

SINGLE_COLUMN, FULL_WIDTH = 3.3, 7.0  # inches, a two-column paper
TARGET, DIVERSITY = "target/mean", "diversity/pairwise"

#: one colour per method label, in every figure of every tool (labels not listed get the FALLBACK colours)
COLORS = {
    "base": "black", "best_of_n": "tab:blue", "svdd_pm": "tab:orange", "svdd_mc": "tab:brown",
    "smc": "tab:pink", "tds": "tab:gray", "fk": "tab:cyan", "das": "#006d2c", "dps": "#8c6d31",
    "das_k4": "tab:green", "das_k16": "tab:olive", "draft": "tab:red", "ddpo": "tab:purple",
    "ode_bon": "#393b79", "sde_bon": "#6b6ecf", "svdd_linear": "#e6550d", "svdd_vp": "#fdae6b",
    "rbf_linear": "#843c39", "rbf_vp": "#d6616b", "das_vp": "#31a354",
}
FALLBACK = ["#5254a3", "#8ca252", "#bd9e39", "#ad494a", "#a55194", "#3182bd", "#756bb1", "#636363", "#637939",
            "#7b4173", "#e7ba52", "#6baed6", "#ce6dbd", "#9c9ede", "#b5cf6b", "#e7969c"]  # none of COLORS


def method_colors(labels: Iterable[str]) -> dict[str, str]:
    """The colour of every method label: its fixed colour in :data:`COLORS`, else the next unused
    :data:`FALLBACK` colour in sorted label order (so one set of labels always gets the same colours)."""
    from matplotlib.colors import to_hex

    labels = sorted(set(labels))
    colors = {m: to_hex(COLORS[m]) for m in labels if m in COLORS}
    for j, m in enumerate(m for m in labels if m not in colors):
        colors[m] = FALLBACK[j % len(FALLBACK)]
    return colors


# ----------------------------------------------------------------------------- run directories
def method_label(run_dir: Path) -> str:
    """A run directory's method: its name without the budget, K, reward and seed suffixes
    (``svdd_vp_nfe200`` and ``das_k4_K4_digit_seed0`` give ``svdd_vp`` and ``das_k4``;
    ``finetune_draft`` gives ``draft``)."""
    name = Path(run_dir).name
    name = re.sub(r"^finetune_", "", name)
    name = re.sub(r"_K\d+(_.*)?$", "", name)
    return re.sub(r"_nfe\d+$", "", name) or name


@dataclass
class Run:
    """One run directory: a sampling run (``metrics.json``) or a fine-tuning curve (``val_metrics.jsonl``)."""

    path: Optional[Path]              # None for a run given as numbers only
    label: str
    sampler: str                      # the sampler's (or fine-tuning module's) class name
    metrics: dict[str, float]         # metrics.json, or the last validation row of a fine-tuning run
    curve: list[dict] = field(default_factory=list)  # fine-tuning validation rows over steps
    identity: dict[str, Any] = field(default_factory=dict)  # what makes it its method (tsf.identity.method_identity)
    settings: dict[str, Any] = field(default_factory=dict)  # its whole resolved config, flat (tsf.identity.flatten_config)

    @property
    def is_finetune(self) -> bool:
        return bool(self.curve)

    @property
    def nfe(self) -> float:
        return self.cost("compute/nfe")

    def cost(self, key: str) -> float:
        """A compute axis per sample: ``compute/nfe``, ``compute/nfe_total`` (forward evaluations plus the
        backward passes of the gradient samplers, ``nfe + nfe_grad``) or ``compute/seconds``."""
        if key == "compute/nfe_total":
            return self.cost("compute/nfe") + float(self.metrics.get("compute/nfe_grad", 0.0))
        return float(self.metrics.get(key, float("nan")))

    @property
    def num_particles(self) -> Optional[int]:
        k = self.settings.get("model.init_args.sampler.init_args.num_particles")
        return int(k) if isinstance(k, (int, float)) else None

    @property
    def target_name(self) -> Optional[str]:
        """The target reward's name: from ``samples.pt`` (its rewards by name) or the config."""
        name = self._sampled_target()
        if name is None:
            value = self.settings.get("model.init_args.reward") or self.settings.get("model.init_args.reward.class_path")
            name = None if value is None else short_value(value)
        return name

    def _rewards(self) -> dict[str, Any]:
        """``samples.pt``'s rewards by name (empty for a run without it, or one given as numbers only)."""
        return (self.samples or {}).get("rewards") or {}

    def _sampled_target(self) -> Optional[str]:
        """The name of the target reward among ``samples.pt``'s rewards: the one that is no cross-reward."""
        cross = {k.split("/")[1] for k in self.cross_keys()}
        return next((n for n in self._rewards() if n not in cross), None)

    def _tensors(self, name: str) -> Optional[dict[str, Any]]:
        """The run directory's file ``name`` (tensors only: no arbitrary pickle), or ``None``."""
        import torch

        path = self.path / name if self.path is not None else None
        return torch.load(path, weights_only=True, map_location="cpu") if path and path.is_file() else None

    @cached_property
    def samples(self) -> Optional[dict[str, Any]]:
        """``samples.pt``, or ``None``."""
        return self._tensors("samples.pt")

    @cached_property
    def diagnostics(self) -> Optional[dict[str, Any]]:
        """``diagnostics.pt`` (SMC: ``sample_id``, ``log_z``, ``ess_fraction``, ``resampled``), or ``None``."""
        return self._tensors("diagnostics.pt")

    def cross_keys(self) -> list[str]:
        return sorted(k for k in self.metrics if k.startswith("cross/") and k.endswith("/mean"))

    def per_sample(self, key: str) -> Optional[np.ndarray]:
        """Per-sample values behind the mean metric ``key`` (``target/mean``, ``cross/<r>/mean``) from samples.pt."""
        rewards = self._rewards()
        if key == TARGET:
            name = self._sampled_target()
        else:
            name = key.split("/")[1] if key.startswith("cross/") else None
        return None if name not in rewards else rewards[name].double().numpy()


def _sampler_name(config: dict) -> str:
    """The sampler's class name in a nested config (``config.yaml``) or a flattened one (a wandb run's)."""
    init = (config.get("model") or {}).get("init_args") or {}
    path = ((init.get("sampler") or {}).get("class_path") or config.get("model.init_args.sampler.class_path")
            or (config.get("model") or {}).get("class_path") or config.get("model.class_path") or "?")
    return str(path).rsplit(".", 1)[-1]


def load_run(run_dir: Path) -> Run:
    """Read one run directory; :class:`ConfigError` when it holds neither kind of run."""
    d = Path(run_dir)
    config = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").is_file() else {}
    identity, settings = method_identity(config), flatten_config(config)
    if (d / "metrics.json").is_file():
        return Run(d, method_label(d), _sampler_name(config), json.loads((d / "metrics.json").read_text()),
                   identity=identity, settings=settings)
    if (d / "val_metrics.jsonl").is_file():
        curve = [json.loads(line) for line in (d / "val_metrics.jsonl").read_text().splitlines() if line.strip()]
        if curve:
            return Run(d, method_label(d), _sampler_name(config) if config else "fine-tuning", curve[-1], curve,
                       identity, settings)
    raise ConfigError(f"{d} is not a run directory (no metrics.json or val_metrics.jsonl)")


def load_runs(run_dirs: Iterable[Path], note: Callable[[str], None] = print) -> list[Run]:
    """Every readable run (others are noted and left out), labelled by :func:`distinct_labels`."""
    runs = []
    for d in run_dirs:
        try:
            runs.append(load_run(d))
        except ConfigError as err:
            if Path(d).is_dir():
                note(f"note: {err}; left out")
    return distinct_labels(runs)


def wandb_runs(project: str, note: Callable[[str], None] = print, api=None) -> list[Run]:
    """The runs of a wandb project (``entity/project``) as numbers only: their summary metrics (a
    sampling run's ``target/mean`` ...) or, for fine-tuning runs, their ``val/...`` history as a curve.
    wandb keeps no ``samples.pt``, so these runs get no bootstrap bands, grids or SMC diagnostics."""
    try:
        if api is None:
            import wandb

            api = wandb.Api(timeout=30)
        found = list(api.runs(project))
    except Exception as err:  # no network, no login, no such project
        raise ConfigError(f"cannot read the wandb project {project!r} ({type(err).__name__}: {str(err)[:200]}); "
                          "reading a project needs network and `wandb login` (offline, pass run directories)") from err
    runs = []
    for r in found:
        numbers = {k: float(v) for k, v in dict(r.summary).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("_")}
        config = r.config if isinstance(r.config, dict) else {}
        sampler, identity = _sampler_name(config), method_identity(config)
        label = method_label(Path(r.name))
        if TARGET in numbers:
            runs.append(Run(None, label, sampler, numbers, identity=identity, settings=flatten_config(config)))
        elif f"val/{TARGET}" in numbers:
            curve = [{"step": row.get("trainer/global_step", row.get("_step")),
                      **{k[4:]: v for k, v in row.items() if k.startswith("val/") and v is not None}}
                     for row in r.history(pandas=False) if row.get(f"val/{TARGET}") is not None]
            if curve:
                runs.append(Run(None, label, sampler if sampler != "?" else "fine-tuning", curve[-1], curve, identity))
        else:
            note(f"note: wandb run {r.name!r} has no {TARGET} or val/{TARGET}; left out")
    return runs


def distinct_labels(runs: list[Run]) -> list[Run]:
    """Runs that share a label (a run name's method part) but not their resolved config's method settings
    get the settings that differ appended (another sampler class, alpha, T, an adapter, ...), so that
    different methods never share a curve or a colour; replicates (other seeds, sizes or budgets) keep
    one label."""
    for r, label in zip(runs, distinguishing_labels([r.label for r in runs], [r.identity for r in runs])):
        r.label = label
    return runs


def by_method(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Runs grouped by method label (sorted), each group in increasing NFE."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    return {m: sorted(groups[m], key=lambda r: r.nfe) for m in sorted(groups)}


# ----------------------------------------------------------------------------- statistics
def bootstrap_ci(values, num_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (fixed seed: reproducible)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(num_resamples, x.size))].mean(1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass
class Series:
    """One method's points in one panel: x, y and (where per-sample values exist) y's confidence band."""

    label: str
    x: np.ndarray
    y: np.ndarray
    y_lo: Optional[np.ndarray] = None
    y_hi: Optional[np.ndarray] = None
    x_lo: Optional[np.ndarray] = None
    x_hi: Optional[np.ndarray] = None


COMPUTE_AXES = {"compute/nfe": "NFE per sample", "compute/nfe_total": "NFE + backward passes per sample",
                "compute/seconds": "seconds per sample"}


def _pooled(runs: list[Run], key: str) -> Optional[np.ndarray]:
    """The per-sample values behind ``key`` of every run of a point (replicates pooled), or ``None``."""
    values = [r.per_sample(key) for r in runs]
    return None if any(v is None or not len(v) for v in values) else np.concatenate(values)


def _value(runs: list[Run], key: str) -> float:
    """A point's value of ``key``: a compute axis averaged, a metric over the pooled samples (the mean of
    the runs' means when they have no per-sample values)."""
    if key in COMPUTE_AXES:
        return float(np.mean([r.cost(key) for r in runs]))
    pooled = _pooled(runs, key)  # per-sample values exist for the target and the cross-rewards only
    if pooled is not None:
        finite = pooled[np.isfinite(pooled)]
        return float(finite.mean()) if len(finite) else float("nan")
    return float(np.mean([r.metrics[key] for r in runs]))


def _interval(points: list[list[Run]], key: str, ci: dict) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    if key in COMPUTE_AXES:
        return None, None
    pooled = [_pooled(p, key) for p in points]
    if any(v is None for v in pooled):
        return None, None
    lo, hi = zip(*(bootstrap_ci(v[np.isfinite(v)], **ci) for v in pooled))
    return np.array(lo), np.array(hi)


def series(runs: list[Run], x_key: str, y_key: str, ci: Optional[dict] = None) -> Series:
    """One method's points, in order of its budget (NFE): runs at the same budget (replicates: other
    seeds) are one point over their pooled samples, so a curve never zigzags between replicates; with
    bootstrap intervals of every per-sample mean metric."""
    ci = ci or {}
    points: dict[float, list[Run]] = {}
    for r in sorted(runs, key=lambda r: r.nfe):
        points.setdefault(round(r.nfe, 6) if np.isfinite(r.nfe) else float(len(points)), []).append(r)
    groups = list(points.values())
    x = np.array([_value(g, x_key) for g in groups], dtype=float)
    y = np.array([_value(g, y_key) for g in groups], dtype=float)
    y_lo, y_hi = _interval(groups, y_key, ci)
    x_lo, x_hi = _interval(groups, x_key, ci)
    return Series(runs[0].label, x, y, y_lo, y_hi, x_lo, x_hi)


def scaling_series(runs: list[Run], key: str = TARGET, ci: Optional[dict] = None,
                   x_key: str = "compute/nfe") -> dict[str, Series]:
    """Per method, ``key`` against a compute axis (``x_key``) with its bootstrap band (sampling runs that
    have ``key``)."""
    sampling = [r for r in runs if not r.is_finetune and key in r.metrics and np.isfinite(r.cost(x_key))]
    return {m: series(group, x_key, key, ci) for m, group in by_method(sampling).items()}


# ----------------------------------------------------------------------------- drawing
class MissingInput(Exception):
    """A figure's inputs are absent from every run: the figure is skipped with a note."""


def style():
    """Small fonts and thin lines for a two-column paper."""
    import matplotlib

    matplotlib.use("Agg")
    return matplotlib.rc_context({
        "font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "xtick.labelsize": 6, "ytick.labelsize": 6,
        "legend.fontsize": 6, "lines.linewidth": 1.0, "lines.markersize": 3, "axes.linewidth": 0.6,
        "legend.frameon": False, "savefig.bbox": "tight", "savefig.pad_inches": 0.02,
    })


def tag(artists, label: str) -> None:
    """Mark artists as drawing ``label`` (their gid), so that a method's colour can be checked in any figure."""
    for a in artists if isinstance(artists, (list, tuple)) else [artists]:
        if a is not None:
            a.set_gid(label)


def draw(ax, s: Series, color: str, legend: str, band: bool = True, marker: str = "o", **line) -> None:
    """A method in one panel: a line with a shaded band, or a single point with error bars."""
    if len(s.x) == 1 or not band:
        xerr = None if s.x_lo is None else np.abs(np.stack([s.x - s.x_lo, s.x_hi - s.x]))
        yerr = None if s.y_lo is None else np.abs(np.stack([s.y - s.y_lo, s.y_hi - s.y]))
        fmt = marker if len(s.x) == 1 else f"{marker}-"
        c = ax.errorbar(s.x, s.y, xerr=xerr, yerr=yerr, fmt=fmt, color=color, label=legend, elinewidth=0.6,
                        capsize=1.5, zorder=3, **line)
        tag([c.lines[0], *c.lines[1], *c.lines[2]], s.label)
        return
    (ln,) = ax.plot(s.x, s.y, marker=marker, color=color, label=legend, **line)
    tag(ln, s.label)
    if s.y_lo is not None:
        tag(ax.fill_between(s.x, s.y_lo, s.y_hi, color=color, alpha=0.2, linewidth=0), s.label)


def thinned(values: Iterable[float], ratio: float = 1.4) -> list[float]:
    """Tick values no two of which are within ``ratio`` of each other (on a log axis): values that close are
    one tick, the roundest of them (most trailing zeros, then the largest), so runs at 46, 50 and 38 NFE (the
    budget 50 as each method spends it) give the tick 50, and 99 and 100 give 100."""
    def roundness(v: float) -> tuple[int, float]:
        n, zeros = int(round(v)), 0
        while n and n % 10 == 0 and float(n) == round(v, 1):
            n, zeros = n // 10, zeros + 1
        return zeros, v

    groups: list[list[float]] = []
    for v in sorted({round(float(v), 1) for v in values if np.isfinite(v) and v > 0}):
        if groups and v < groups[-1][0] * ratio:
            groups[-1].append(v)
        else:
            groups.append([v])
    return [max(g, key=roundness) for g in groups]


def log_nfe_axis(ax, nfe: Iterable[float], key: str = "compute/nfe") -> None:
    """Log-scale compute axis, ticked at the runs' values when they are few (values within 40% of each
    other share their roundest tick, so that labels never overlap), else at 1-2-5 steps."""
    import matplotlib.ticker as mt

    ax.set_xscale("log")
    values = thinned(nfe)
    ax.xaxis.set_major_locator(mt.FixedLocator(values) if len(values) <= 6 else mt.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(mt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(mt.NullFormatter())
    ax.set_xlabel(COMPUTE_AXES.get(key, key))


def legend_below(fig, axes) -> None:
    """One legend for the figure, under the panels (every method once)."""
    handles = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(len(handles), 6 if fig.get_figwidth() > SINGLE_COLUMN else 3), handlelength=1.6,
                   columnspacing=1.0)


def metric_label(key: str, runs: Iterable[Run] = ()) -> str:
    """An axis label that names the reward (``target reward: digit (mean)``) when the runs share one."""
    if key == TARGET:
        names = {r.target_name for r in runs} - {None}
        return f"target reward: {names.pop()} (mean)" if len(names) == 1 else "target reward (mean)"
    if key.startswith("cross/"):
        return f"cross-reward: {key.split('/')[1]} (mean)"
    return {"diversity/pairwise": "diversity (pairwise)", "diversity/vendi": "diversity (Vendi)",
            **COMPUTE_AXES}.get(key, key)


# ----------------------------------------------------------------------------- the figures
def scaling_figure(runs: list[Run], colors: dict[str, str], ci: Optional[dict] = None, x_key: str = "compute/nfe"):
    """Target reward against a compute axis (``x_key``: NFE per sample, NFE plus backward passes, or
    seconds; log scale) with bootstrap bands; cross-reward (banded too) and diversity beside it where the
    runs have them."""
    import matplotlib.pyplot as plt

    sampling = [r for r in runs if not r.is_finetune and TARGET in r.metrics]
    if not sampling:
        raise MissingInput("no sampling run with target/mean")
    keys = [TARGET] + [k for k in sampling[0].cross_keys() if all(k in r.metrics for r in sampling)]
    keys += [DIVERSITY] if all(DIVERSITY in r.metrics for r in sampling) else []
    fig, axes = plt.subplots(1, len(keys), figsize=(FULL_WIDTH if len(keys) > 1 else SINGLE_COLUMN, 2.3),
                             layout="constrained", squeeze=False)
    for ax, key in zip(axes[0], keys):
        for m, s in scaling_series(sampling, key, ci, x_key).items():
            draw(ax, s, colors[m], m)
        log_nfe_axis(ax, (r.cost(x_key) for r in sampling), x_key)
        ax.set_title(metric_label(key, sampling))
    axes[0, 0].set_ylabel(f"mean ({100 * (ci or {}).get('level', 0.95):g}% bootstrap band)")
    legend_below(fig, axes)
    return fig


def tradeoff(ax, runs: list[Run], colors: dict[str, str], x_key: str, y_key: str, ci: Optional[dict]) -> None:
    """``y_key`` against ``x_key``: each sampling method's runs in NFE order (a point when there is one),
    each fine-tuning run as its validation curve over steps, the last step annotated."""
    for m, group in by_method(r for r in runs if x_key in r.metrics and y_key in r.metrics).items():
        sampling = [r for r in group if not r.is_finetune]
        if sampling:
            draw(ax, series(sampling, x_key, y_key, ci), colors[m], m, band=False)
        for r in (r for r in group if r.is_finetune):
            rows = [row for row in r.curve if x_key in row and y_key in row]
            (ln,) = ax.plot([row[x_key] for row in rows], [row[y_key] for row in rows], marker=".", ls="--",
                            color=colors[m], label=f"{m} (fine-tuning)")
            tag(ln, m)
            ax.annotate(f"step {rows[-1]['step']}", (rows[-1][x_key], rows[-1][y_key]), fontsize=5,
                        xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel(metric_label(x_key, runs))
    ax.set_ylabel(metric_label(y_key, runs))


def _cross_key(runs: list[Run]) -> str:
    keys = sorted({k for r in runs for k in r.cross_keys()})
    if not keys:
        raise MissingInput("no run has a cross-reward (cross_rewards: [] or not evaluated)")
    return keys[0]


def _with(runs: list[Run], *keys: str) -> list[Run]:
    return [r for r in runs if all(k in r.metrics for k in keys)]


def tradeoff_figure(runs: list[Run], colors: dict[str, str], x_key: str, y_key: str, ci: Optional[dict] = None):
    """``y_key`` against ``x_key`` in one single-column panel (see :func:`tradeoff`)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(SINGLE_COLUMN, 2.9), layout="constrained")
    tradeoff(ax, _with(runs, x_key, y_key), colors, x_key, y_key, ci)
    legend_below(fig, [ax])
    return fig


def frontier_figure(runs: list[Run], colors: dict[str, str], ci: Optional[dict] = None):
    """Target reward against cross-reward: the over-optimisation frontier (single column)."""
    return tradeoff_figure(runs, colors, _cross_key(runs), TARGET, ci)


def diversity_figure(runs: list[Run], colors: dict[str, str], ci: Optional[dict] = None):
    """Diversity against target reward (single column)."""
    if not _with(runs, DIVERSITY, TARGET):
        raise MissingInput(f"no run has {DIVERSITY}")
    return tradeoff_figure(runs, colors, TARGET, DIVERSITY, ci)


def overoptimisation_panels(runs: list[Run], colors: dict[str, str], ci: Optional[dict] = None):
    """The frontier and diversity against target side by side (full width): the README's figure."""
    import matplotlib.pyplot as plt

    cross = _cross_key(runs)
    fig, axes = plt.subplots(1, 2, figsize=(FULL_WIDTH, 2.7), layout="constrained")
    tradeoff(axes[0], _with(runs, cross, TARGET), colors, cross, TARGET, ci)
    tradeoff(axes[1], _with(runs, DIVERSITY, TARGET), colors, TARGET, DIVERSITY, ci)
    legend_below(fig, axes)
    return fig


def grid_rows(runs: list[Run], num_samples: int, note: Callable[[str], None] = print):
    """``(ids, [(method, run, images [n, C, H, W])])``: per method its largest-NFE run with images,
    showing the first ``num_samples`` sample ids that every such run has."""
    import torch

    chosen = [g[-1] for g in by_method(r for r in runs if r.samples is not None and "images" in r.samples).values()]
    if not chosen:
        raise MissingInput("no run has images")
    shape = tuple(chosen[0].samples["images"].shape[1:])
    for r in [r for r in chosen if tuple(r.samples["images"].shape[1:]) != shape]:
        note(f"note: grids: {r.path} has images of another shape; left out")
        chosen.remove(r)
    common = set.intersection(*(set(r.samples["sample_id"].tolist()) for r in chosen))
    if not common:
        raise MissingInput("the runs with images share no sample id")
    ids = torch.tensor(sorted(common)[:num_samples])
    rows = []
    for r in chosen:
        pos = torch.searchsorted(r.samples["sample_id"], ids)
        rows.append((r.label, r, r.samples["images"][pos]))
    return ids, rows


def grids_figure(runs: list[Run], colors: dict[str, str], num_samples: int = 10,
                 note: Callable[[str], None] = print):
    """One row per method (its largest-NFE run), the same sample ids in every row (full width)."""
    import matplotlib.pyplot as plt

    ids, rows = grid_rows(runs, num_samples, note)
    C, H, W = rows[0][2].shape[1:]
    n = len(ids)
    height = FULL_WIDTH * 0.82 / n * H / W
    fig, axes = plt.subplots(len(rows), 1, figsize=(FULL_WIDTH, 0.25 + len(rows) * (height + 0.06)),
                             layout="constrained", squeeze=False)
    for ax, (m, r, images) in zip(axes[:, 0], rows):
        pad = np.full((C, H, 1), 255, dtype=np.uint8)
        strip = np.concatenate([a for im in images.numpy() for a in (im, pad)][:-1], axis=2)
        ax.imshow(strip[0] if C == 1 else strip.transpose(1, 2, 0), cmap="gray" if C == 1 else None,
                  vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([(j + 0.5) * (W + 1) - 1 for j in range(n)] if ax is axes[0, 0] else [])
        if ax is axes[0, 0]:
            ax.set_xticklabels([f"id {i}" for i in ids.tolist()])
            ax.xaxis.set_ticks_position("top")
        ax.set_yticks([])
        nfe = f"\nNFE {r.nfe:.0f}" if np.isfinite(r.nfe) else ""
        label = ax.set_ylabel(f"{m}{nfe}", rotation=0, ha="right", va="center", color=colors[m])
        tag(label, m)
        for spine in ax.spines.values():
            spine.set_color(colors[m])
    return fig


def smc_figure(runs: list[Run], colors: dict[str, str]):
    """ESS / K (mean over samples, 10-90% band) and the fraction of samples resampled at each step (full width)."""
    import matplotlib.pyplot as plt

    def trivial(r: Run) -> bool:  # one particle: ESS / K is 1 and nothing is resampled, at every step
        d = r.diagnostics
        return r.num_particles == 1 or (bool((d["ess_fraction"] == 1).all()) and not bool(d["resampled"].any()))

    smc = [r for r in runs if r.diagnostics is not None and not trivial(r)]
    if not smc:
        raise MissingInput("no run has diagnostics.pt with more than one particle (SMC-family samplers write it)")
    fig, axes = plt.subplots(1, 2, figsize=(FULL_WIDTH, 2.2), layout="constrained")
    for m, group in by_method(smc).items():
        for j, r in enumerate(group):
            ess = r.diagnostics["ess_fraction"].double().numpy()
            steps = np.arange(1, ess.shape[1] + 1)
            legend = m if len(group) == 1 else f"{m}, NFE {r.nfe:.0f}"
            ls = ["-", "--", ":", "-."][j % 4]
            (ln,) = axes[0].plot(steps, ess.mean(0), color=colors[m], ls=ls, label=legend)
            q10, q90 = np.quantile(ess, [0.1, 0.9], axis=0)
            tag([ln, axes[0].fill_between(steps, q10, q90, color=colors[m], alpha=0.15, linewidth=0)], m)
            (ln,) = axes[1].plot(steps, r.diagnostics["resampled"].double().mean(0).numpy(), color=colors[m],
                                 ls=ls, marker=".", label=legend)
            tag(ln, m)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_ylabel("ESS / K (mean, 10-90% band)")
    axes[1].set_ylim(-0.03, 1.03)
    axes[1].set_ylabel("fraction of samples resampled")
    for ax in axes:
        ax.set_xlabel("sampling step")
    legend_below(fig, axes)
    return fig


FIGURES = ("scaling", "frontier", "diversity", "overoptimisation", "grids", "smc_diagnostics")


def build(name: str, runs: list[Run], colors: dict[str, str], ci: dict, grid_samples: int, note,
          x_key: str = "compute/nfe"):
    """The named figure (a matplotlib Figure); :class:`MissingInput` when the runs lack its inputs."""
    if name == "scaling":
        return scaling_figure(runs, colors, ci, x_key)
    if name == "frontier":
        return frontier_figure(runs, colors, ci)
    if name == "diversity":
        return diversity_figure(runs, colors, ci)
    if name == "overoptimisation":
        return overoptimisation_panels(runs, colors, ci)
    if name == "grids":
        return grids_figure(runs, colors, grid_samples, note)
    if name == "smc_diagnostics":
        return smc_figure(runs, colors)
    raise ConfigError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")


def save_figure(fig, out: Path, formats: Iterable[str] = ("png", "pdf"), dpi: int = 200) -> list[Path]:
    """``out.png`` and ``out.pdf`` (``out`` without suffix; or the given ``formats``); the figure is closed."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_name(f"{out.name}.{ext}") for ext in formats]
    for p in paths:
        fig.savefig(p, dpi=dpi)
    plt.close(fig)
    return paths


def make_figures(runs: list[Run], out: Path, only: Optional[Iterable[str]] = None, prefix: str = "",
                 ci: Optional[dict] = None, grid_samples: int = 10, formats: Iterable[str] = ("png", "pdf"),
                 dpi: int = 200, note: Callable[[str], None] = print, x_key: str = "compute/nfe") -> list[Path]:
    """Every figure (or those in ``only``) into ``out/<prefix><name>.{png,pdf}``; returns the files written.
    A figure whose inputs no run has is skipped with a note. ``x_key`` is the scaling figure's compute axis."""
    colors = method_colors(r.label for r in runs)
    written = []
    with style():
        for name in only or FIGURES:
            try:
                fig = build(name, runs, colors, ci or {}, grid_samples, note, x_key)
            except MissingInput as why:
                note(f"note: {name} skipped: {why}")
                continue
            written += save_figure(fig, Path(out) / f"{prefix}{name}", formats, dpi)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="tsf figures", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("run_dirs", nargs="*", type=Path, help="run directories (others, e.g. files of a glob, are ignored)")
    p.add_argument("--out", type=Path, required=True, help="directory for the figures")
    p.add_argument("--only", nargs="+", choices=FIGURES, default=None, help="draw only these figures")
    p.add_argument("--prefix", default="", help="prepended to every file name (e.g. digits_flow_)")
    p.add_argument("--formats", nargs="+", default=["png", "pdf"], help="file formats (matplotlib's)")
    p.add_argument("--dpi", type=int, default=200, help="resolution of the raster formats")
    p.add_argument("--grid_samples", type=int, default=10, help="sample ids per grid row")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the confidence bands")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the bands")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--x", choices=["nfe", "nfe_total", "seconds"], default="nfe",
                   help="the scaling figure's compute axis: NFE per sample, NFE plus backward passes (what a "
                        "gradient sampler such as DAS also spends), or wall seconds per sample")
    p.add_argument("--wandb_project", default=None,
                   help="also draw the runs of this wandb project (entity/project; needs network and a login)")
    args = p.parse_args(argv)
    if not 0 < args.level < 1 or args.bootstrap < 1:
        p.error("--level must be in (0, 1) and --bootstrap >= 1")
    for d in args.run_dirs:
        if not d.exists():
            print(f"note: {d} does not exist; left out")
    runs = load_runs(d for d in args.run_dirs if d.is_dir())
    if args.wandb_project:
        try:
            runs = distinct_labels(runs + wandb_runs(args.wandb_project))
        except ConfigError as err:
            sys.exit(f"tsf figures: error: {err}")
    if not runs:
        sys.exit("tsf figures: error: no run directory (metrics.json or val_metrics.jsonl) among the arguments")
    ci = {"num_resamples": args.bootstrap, "level": args.level, "seed": args.seed}
    written = make_figures(runs, args.out, args.only, args.prefix, ci, args.grid_samples, args.formats, args.dpi,
                           x_key=f"compute/{args.x}")
    print(f"{len(runs)} runs, {len(by_method(runs))} methods; wrote:")
    print("\n".join(f"  {p}" for p in written))
