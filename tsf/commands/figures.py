"""Paper figures from run directories.

``tsf figures RUN_DIRS... --out DIR``: the paper's figures, PDF and PNG each, from the run directories
that ``tsf sample``, ``tsf compare`` and ``tsf scaling`` write (and the ``val_metrics.jsonl`` curves of
``tsf finetune``): reward against NFE (scaling curves with bootstrap confidence bands), target against
cross-reward (the over-optimisation frontier), diversity against target (and both side by side), sample
grids of every method on the same sample ids (columns headed by their class or prompt), and SMC diagnostics
(ESS and resampling over the steps). One colour and one marker per method in every figure (a palette whose
colours stay apart), a labelled tick at every run's compute, end labels clear of the points, curves at
equal values both visible; legend labels from ``--labels`` or a run's ``label:``; sizes for a two-column paper.

``tsf overopt`` (:mod:`tsf.commands.overopt`) draws the over-optimisation figure with them.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional

import numpy as np
import yaml

from tsf.commands import ToolParser
from tsf.errors import ConfigError
from tsf.identity import distinguishing_labels, flatten_config, method_identity, short_value

SINGLE_COLUMN, FULL_WIDTH = 3.3, 7.0  # inches, a two-column paper
TARGET, DIVERSITY = "target/mean", "diversity/pairwise"

#: a categorical palette whose colours stay apart (matplotlib's tab10); a method set of more than ten
#: methods reuses colours, never a (colour, marker) pair
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*"]
BASE = "base"  # the base model's run: black, a filled circle
#: the preferred (PALETTE index, marker) of known methods; methods of one family (ode_bon, sde_bon) prefer
#: different colours and markers, and a method whose preference another method of the figure already holds
#: gets the first free colour and marker (so every method of a figure keeps its own)
PREFERRED = {
    "best_of_n": (0, "s"), "ode_bon": (0, "s"), "sde_bon": (7, "D"), "svdd_pm": (1, "^"), "svdd_mc": (5, "v"),
    "svdd_linear": (1, "^"), "svdd_vp": (5, "v"), "smc": (6, "P"), "smc_linear": (6, "P"), "smc_vp": (8, "X"),
    "tds": (9, "<"), "fk": (8, "X"), "das": (2, ">"), "das_vp": (2, ">"), "das_linear": (2, ">"),
    "das_k4": (2, ">"), "das_k16": (8, "<"), "dps": (5, "*"), "draft": (3, "p"), "ddpo": (4, "h"),
    "grpo": (9, "v"), "rbf_linear": (4, "h"), "rbf_vp": (3, "p"), "sop": (7, "<"), "code": (9, "*"),
    "code_vp": (9, "*"),
}


class Style(NamedTuple):
    """How one method is drawn in every figure: its colour and its marker."""

    color: str
    marker: str


def method_key(label: str) -> str:
    """The method a label draws (``das_k4 (adapter=draft)`` -> ``das_k4``): what :data:`PREFERRED` is keyed by."""
    return label.split(" (")[0]


def method_styles(labels: Iterable[str], methods: Optional[dict[str, str]] = None) -> dict[str, Style]:
    """The colour and marker of every method label, the same in every figure drawn from one set of labels:
    ``base`` black; a known method its :data:`PREFERRED` colour and marker unless a method before it (in
    sorted order) holds them; the others the first free colour and marker, so that no two methods of a
    figure share a colour (up to ten methods) or a marker (up to twelve). ``methods`` gives a label's
    default label where ``--labels`` renamed it (``Best-of-N`` keeps ``best_of_n``'s style)."""
    labels = sorted(set(labels))
    methods = methods or {}

    def key_of(label: str) -> str:
        return method_key(methods.get(label, label))

    styles: dict[str, Style] = {}
    used_c = dict.fromkeys(range(len(PALETTE)), 0)
    used_m = dict.fromkeys(MARKERS, 0)

    def take(used: dict, want) -> Any:  # the preferred value while free, else the least used (first in order)
        choice = want if want in used and used[want] == 0 else min(used, key=lambda v: used[v])
        used[choice] += 1
        return choice

    for m in (m for m in labels if key_of(m) == BASE):
        styles[m] = Style("#000000", take(used_m, "o"))
    known = [m for m in labels if m not in styles and key_of(m) in PREFERRED]
    for m in known + [m for m in labels if m not in styles and m not in known]:
        c, mk = PREFERRED.get(key_of(m), (None, None))
        styles[m] = Style(PALETTE[take(used_c, c)], take(used_m, mk))
    return styles


def method_colors(labels: Iterable[str]) -> dict[str, str]:
    """The colour of every method label (:func:`method_styles`)."""
    return {m: s.color for m, s in method_styles(labels).items()}


def as_style(value) -> Style:
    """A :class:`Style`, or a bare colour as one (with a circle)."""
    return value if isinstance(value, Style) else Style(str(value), "o")


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
    default: str = ""                 # its label before a user's (config `label:`, --labels): what picks its style

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
        if not (path and path.is_file()):
            return None
        try:  # memory-mapped: a table that reads the rewards does not read a large run's images
            return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError:  # a file in torch's legacy format cannot be mapped
            return torch.load(path, weights_only=True, map_location="cpu")

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


def load_runs(run_dirs: Iterable[Path], note: Callable[[str], None] = print,
              labels: Optional[dict[str, str]] = None) -> list[Run]:
    """Every readable run (others are noted and left out), labelled by :func:`distinct_labels`, then by a
    ``label:`` in its ``config.yaml`` and by ``labels`` (:func:`relabel`)."""
    runs = []
    for d in run_dirs:
        try:
            runs.append(load_run(d))
        except ConfigError as err:
            if Path(d).is_dir():
                note(f"note: {err}; left out")
    return relabel(distinct_labels(runs), labels)


def relabel(runs: list[Run], labels: Optional[dict[str, str]] = None) -> list[Run]:
    """Each run's legend label: a ``label:`` field of its ``config.yaml`` replaces the default one, and
    ``labels`` (``tsf figures --labels``) replaces either, matched by the run directory's path as given,
    its name, its label or its method (the label without its settings, which a variant keeps: ``das_k4
    (adapter=draft)`` with ``das_k4=DAS`` gives ``DAS (adapter=draft)``); several runs given one label are
    one method (one curve over their budgets). A key that matches no run is a :class:`ConfigError`."""
    for r in runs:
        r.default = r.default or r.label
        own = r.settings.get("label")
        if isinstance(own, str) and own.strip():
            r.label = own.strip()
    if not labels:
        return runs
    keys = [[str(r.path), r.path.name] if r.path is not None else [] for r in runs]
    keys = [[*k, r.label, method_key(r.label)] for k, r in zip(keys, runs)]
    unknown = [k for k in labels if not any(k in ks for ks in keys)]
    if unknown:
        raise ConfigError(f"--labels: {', '.join(map(repr, unknown))} names no run (give a run directory, its name or "
                          f"a method: {', '.join(sorted({r.label for r in runs}))})")
    for r, ks in zip(runs, keys):
        key = next((k for k in ks if k in labels), None)
        if key is not None:  # a method's label keeps the settings that tell its variants apart
            r.label = labels[key] + (r.label[len(key):] if key == method_key(r.label) != r.label else "")
    return runs


def parse_labels(items: Optional[list[str]], known: Iterable[str] = ()) -> dict[str, str]:
    """``--labels``' items as one mapping: ``KEY=LABEL`` pairs (split at the first ``=`` whose left side is
    one of ``known``, run directories and labels may hold ``=`` too, else at the first), a JSON object, or
    a JSON or YAML file of one."""
    mapping: dict[str, str] = {}
    known = set(known)
    for item in items or []:
        path = Path(item)
        if item.lstrip().startswith("{") or (path.suffix in (".json", ".yaml", ".yml") and path.is_file()):
            try:
                found = yaml.safe_load(path.read_text() if not item.lstrip().startswith("{") else item)
            except yaml.YAMLError as err:
                raise ConfigError(f"--labels {item!r} is not a JSON/YAML mapping ({str(err).splitlines()[0]})") from err
            if not isinstance(found, dict):
                raise ConfigError(f"--labels {item!r} is not a mapping of run (or method) to label")
            mapping.update({str(k): str(v) for k, v in found.items()})
            continue
        cuts = [i for i, ch in enumerate(item) if ch == "="]
        if not cuts:
            raise ConfigError(f"--labels {item!r}: give KEY=LABEL (KEY a run directory, its name or a method), "
                              "a JSON object or a JSON/YAML file")
        cut = next((i for i in cuts if item[:i] in known), cuts[0])
        mapping[item[:cut]] = item[cut + 1:]
    return mapping


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
    """Percentile bootstrap confidence interval of the mean of ``values`` (fixed seed: reproducible):
    ``scipy.stats.bootstrap`` (one value: that value, where scipy asks for two)."""
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if x.size == 1:
        return float(x[0]), float(x[0])
    ci = bootstrap((x,), np.mean, n_resamples=num_resamples, confidence_level=level, method="percentile",
                   vectorized=True, rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


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


#: how close two points are, as a fraction of a panel's span, for one to hide the other
COINCIDE = 0.02


def _normalised(points: Iterable[tuple[np.ndarray, np.ndarray]], log_x: bool):
    """A function mapping a panel's (x, y) arrays to [0, 1] over the span of all ``points`` (x in log10 on a
    log axis), where closeness can be judged whatever the units."""
    xs, ys = zip(*points)
    def fx(x):
        x = np.asarray(x, float)
        return np.log10(np.clip(x, 1e-300, None)) if log_x else x

    allx, ally = np.concatenate([fx(x) for x in xs]), np.concatenate([np.asarray(y, float) for y in ys])
    allx, ally = allx[np.isfinite(allx)], ally[np.isfinite(ally)]
    x0, xs_ = (allx.min(), np.ptp(allx) or 1.0) if len(allx) else (0.0, 1.0)
    y0, ys_ = (ally.min(), np.ptp(ally) or 1.0) if len(ally) else (0.0, 1.0)
    return lambda x, y: np.stack([(fx(x) - x0) / xs_, (np.asarray(y, float) - y0) / ys_], -1)


def hidden(xy: np.ndarray, drawn: list[np.ndarray]) -> tuple[bool, bool]:
    """``(some, all)``: whether some / all of the normalised points ``xy`` lie within :data:`COINCIDE` of a
    point drawn before (``drawn``), where they would be hidden under it."""
    if not drawn or not len(xy):
        return False, False
    before = np.concatenate(drawn)
    near = (np.abs(xy[:, None, :] - before[None, :, :]).max(-1) < COINCIDE).any(1)
    return bool(near.any()), bool(near.all())


def overlay(some: bool, every: bool) -> dict:
    """Line keywords for a method drawn over another at the same values, so that both show: hollow, larger
    markers above (the marker beneath shows inside), and a dashed line where the whole curve coincides."""
    import matplotlib

    if not some:
        return {}
    kw = {"mfc": "none", "ms": matplotlib.rcParams["lines.markersize"] + 2.5, "mew": 0.9, "zorder": 4}
    return {**kw, "ls": (0, (3, 2))} if every else kw


def draw(ax, s: Series, style, legend: str, band: bool = True, **line) -> None:
    """A method in one panel: a line with a shaded band, or a single point with error bars, in the
    method's colour and marker (``line`` keywords, e.g. :func:`overlay`'s, win)."""
    style = as_style(style)
    kw = {"marker": style.marker, "color": style.color, "label": legend, **line}
    if len(s.x) == 1 or not band:
        xerr = None if s.x_lo is None else np.abs(np.stack([s.x - s.x_lo, s.x_hi - s.x]))
        yerr = None if s.y_lo is None else np.abs(np.stack([s.y - s.y_lo, s.y_hi - s.y]))
        kw.setdefault("ls", "none" if len(s.x) == 1 else "-")
        kw.setdefault("zorder", 3)
        c = ax.errorbar(s.x, s.y, xerr=xerr, yerr=yerr, elinewidth=0.6, capsize=1.5, **kw)
        tag([c.lines[0], *c.lines[1], *c.lines[2]], s.label)
        return
    (ln,) = ax.plot(s.x, s.y, **kw)
    tag(ln, s.label)
    if s.y_lo is not None:
        tag(ax.fill_between(s.x, s.y_lo, s.y_hi, color=style.color, alpha=0.2, linewidth=0), s.label)


def log_nfe_axis(ax, nfe: Iterable[float], key: str = "compute/nfe", most: int = 24) -> None:
    """Log-scale compute axis with a tick at every run's value (up to ``most`` values; more get 1-2-5
    steps): labels too close to share a row are staggered below each other by :func:`finish`."""
    import matplotlib.ticker as mt

    ax.set_xscale("log")
    values = sorted({float(f"{float(v):.3g}") for v in nfe if np.isfinite(v) and v > 0})  # 37, 0.00456 s
    ax.xaxis.set_major_locator(mt.FixedLocator(values) if len(values) <= most else mt.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(mt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(mt.NullFormatter())
    ax.set_xlabel(COMPUTE_AXES.get(key, key))
    ax.stagger_ticks = True  # read by finish()


def stagger_ticks(ax, renderer, gap_pt: float = 2.0) -> None:
    """Put each x tick label in the first row below the axis where it overlaps no label of that row (left
    to right), so every tick keeps its label however close the values."""
    ticks = [t for t in ax.xaxis.get_major_ticks() if t.label1.get_visible() and t.label1.get_text()]
    lo, hi = sorted(ax.get_xlim())
    ticks = [t for t in ticks if lo <= t.get_loc() <= hi]
    if not ticks:
        return
    px = renderer.points_to_pixels(1.0)
    base = ticks[0].get_pad() if not hasattr(ax, "_tick_pad") else ax._tick_pad
    ax._tick_pad = base
    right: list[float] = []
    for t in sorted(ticks, key=lambda t: t.get_loc()):
        box = t.label1.get_window_extent(renderer)
        row = next((r for r, x in enumerate(right) if box.x0 > x + gap_pt * px), len(right))
        if row == len(right):
            right.append(box.x1)
        right[row] = box.x1
        t.set_pad(base + row * (box.height / px + 1.0))


def _obstacles(ax, renderer) -> list[tuple[float, float, float]]:
    """``(x, y, r)`` in display pixels: every plotted point (a marker's radius) and points along every line
    and error bar of ``ax`` (every 2 points), what a label must not cover."""
    from matplotlib.collections import LineCollection

    px = renderer.points_to_pixels(1.0)
    found = []

    def along(xy: np.ndarray, r: float) -> None:
        for a, b in zip(xy[:-1], xy[1:]):
            if np.all(np.isfinite([*a, *b])):
                n = max(1, int(np.hypot(*(b - a)) / (2 * px)))
                found.extend((x, y, r) for x, y in np.linspace(a, b, n + 1))

    for ln in ax.lines:
        if not ln.get_visible():
            continue
        xy = ln.get_transform().transform(ln.get_xydata())
        if ln.get_marker() not in (None, "None", "none", "", " "):
            r = (ln.get_markersize() / 2 + 1.0) * px
            found.extend((x, y, r) for x, y in xy if np.isfinite(x) and np.isfinite(y))
        if ln.get_linestyle() not in ("None", "none", "", " "):
            along(xy, 1.0 * px)
    for c in ax.collections:
        if isinstance(c, LineCollection):
            for seg in c.get_segments():
                along(c.get_transform().transform(np.asarray(seg)), 1.0 * px)
    return found


def place_end_labels(ax, renderer) -> None:
    """Move every annotation of ``ax`` (a fine-tuning curve's ``step N``) to the nearest place around its
    point where its text covers no plotted point, line or error bar and no other label, inside the axes;
    a label moved away from its point gets a thin leader line."""
    from matplotlib.text import Annotation

    anns = [t for t in ax.texts if isinstance(t, Annotation)]
    if not anns:
        return
    obstacles = np.array(_obstacles(ax, renderer)).reshape(-1, 3)
    frame = ax.get_window_extent(renderer)
    placed = []
    directions = [(1, 1), (1, 0), (0, 1), (1, -1), (-1, 1), (-1, 0), (0, -1), (-1, -1)]
    for ann in anns:
        best, best_cost = None, None
        for dist in (3, 6, 10, 15, 22, 32):
            for dx, dy in directions:
                ann.xyann = (dx * dist, dy * dist)
                ann.set_ha({1: "left", 0: "center", -1: "right"}[dx])
                ann.set_va({1: "bottom", 0: "center", -1: "top"}[dy])
                box = ann.get_window_extent(renderer)
                inside = ((obstacles[:, 0] > box.x0 - obstacles[:, 2]) & (obstacles[:, 0] < box.x1 + obstacles[:, 2])
                          & (obstacles[:, 1] > box.y0 - obstacles[:, 2]) & (obstacles[:, 1] < box.y1 + obstacles[:, 2]))
                cost = int(inside.sum()) + 10 * sum(box.overlaps(b) for b in placed)
                within = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                cost += 0 if within else 5
                if best_cost is None or cost < best_cost:
                    best, best_cost = (dx * dist, dy * dist, ann.get_ha(), ann.get_va()), cost
                if cost == 0:
                    break
            if best_cost == 0:
                break
        ann.xyann, (ha, va) = best[:2], best[2:]
        ann.set_ha(ha)
        ann.set_va(va)
        if max(abs(best[0]), abs(best[1])) >= 10:  # far from its point: a leader line to it
            ann.remove()
            ann = ax.annotate(ann.get_text(), ann.xy, xytext=best[:2], textcoords="offset points", ha=ha, va=va,
                              fontsize=ann.get_fontsize(), color=ann.get_color(),
                              arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5", "shrinkA": 0, "shrinkB": 2})
        placed.append(ann.get_window_extent(renderer))


def finish(fig) -> None:
    """What needs the final layout: staggered tick labels of compute axes (then the layout again), end
    labels placed clear of the points; the layout is then fixed, so the checks hold in the saved file."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    if any(getattr(ax, "stagger_ticks", False) for ax in fig.axes):
        for ax in fig.axes:
            if getattr(ax, "stagger_ticks", False):
                stagger_ticks(ax, renderer)
        fig.canvas.draw()
    if any(ax.texts for ax in fig.axes):
        fig.set_layout_engine("none")
        for ax in fig.axes:
            place_end_labels(ax, renderer)


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
def scaling_figure(runs: list[Run], styles: dict[str, Style], ci: Optional[dict] = None,
                   x_key: str = "compute/nfe"):
    """Target reward against a compute axis (``x_key``: NFE per sample, NFE plus backward passes, or
    seconds; log scale, a labelled tick at every run's value) with bootstrap bands; cross-reward (banded
    too) and diversity beside it where the runs have them. A curve drawn at the values of one before it
    is drawn over it dashed with hollow markers (:func:`overlay`), so both show."""
    import matplotlib.pyplot as plt

    sampling = [r for r in runs if not r.is_finetune and TARGET in r.metrics]
    if not sampling:
        raise MissingInput("no sampling run with target/mean")
    keys = [TARGET] + [k for k in sampling[0].cross_keys() if all(k in r.metrics for r in sampling)]
    keys += [DIVERSITY] if all(DIVERSITY in r.metrics for r in sampling) else []
    fig, axes = plt.subplots(1, len(keys), figsize=(FULL_WIDTH if len(keys) > 1 else SINGLE_COLUMN, 2.3),
                             layout="constrained", squeeze=False)
    for ax, key in zip(axes[0], keys):
        curves = scaling_series(sampling, key, ci, x_key)
        norm = _normalised([(s.x, s.y) for s in curves.values()], log_x=True)
        drawn: list[np.ndarray] = []
        for m, s in curves.items():
            xy = norm(s.x, s.y)
            draw(ax, s, styles[m], m, **overlay(*hidden(xy, drawn)))
            drawn.append(xy)
        log_nfe_axis(ax, (r.cost(x_key) for r in sampling), x_key)
        ax.set_title(metric_label(key, sampling))
    axes[0, 0].set_ylabel(f"mean ({100 * (ci or {}).get('level', 0.95):g}% bootstrap band)")
    legend_below(fig, axes)
    finish(fig)
    return fig


def tradeoff(ax, runs: list[Run], styles: dict[str, Style], x_key: str, y_key: str, ci: Optional[dict]) -> None:
    """``y_key`` against ``x_key``: each sampling method's runs in NFE order (a point when there is one),
    each fine-tuning run as its validation curve over steps, the last step annotated (placed clear of the
    points by :func:`finish`); points at the values of points drawn before are drawn hollow over them."""
    groups = by_method(r for r in runs if x_key in r.metrics and y_key in r.metrics)
    samplers = {m: series([r for r in g if not r.is_finetune], x_key, y_key, ci)
                for m, g in groups.items() if any(not r.is_finetune for r in g)}
    curves = {m: [[row for row in r.curve if x_key in row and y_key in row] for r in g if r.is_finetune]
              for m, g in groups.items()}
    curves = {m: [rows for rows in c if rows] for m, c in curves.items()}
    points = [(s.x, s.y) for s in samplers.values()]
    points += [([row[x_key] for row in rows], [row[y_key] for row in rows]) for c in curves.values() for rows in c]
    if not points:
        return
    norm = _normalised(points, log_x=False)
    drawn: list[np.ndarray] = []
    for m in groups:
        style = as_style(styles[m])
        for rows in curves[m]:
            x, y = [row[x_key] for row in rows], [row[y_key] for row in rows]
            (ln,) = ax.plot(x, y, marker=style.marker, ms=2.8, ls="--", color=style.color, label=f"{m} (fine-tuning)")
            tag(ln, m)
            ax.annotate(f"step {rows[-1]['step']}", (x[-1], y[-1]), fontsize=5, xytext=(2, 2),
                        textcoords="offset points")
            drawn.append(norm(x, y))
        if m in samplers:
            s = samplers[m]
            xy = norm(s.x, s.y)
            draw(ax, s, style, m, band=False, **overlay(*hidden(xy, drawn)))
            drawn.append(xy)
    ax.set_xlabel(metric_label(x_key, runs))
    ax.set_ylabel(metric_label(y_key, runs))


def _cross_key(runs: list[Run]) -> str:
    keys = sorted({k for r in runs for k in r.cross_keys()})
    if not keys:
        raise MissingInput("no run has a cross-reward (cross_rewards: [] or not evaluated)")
    return keys[0]


def _with(runs: list[Run], *keys: str) -> list[Run]:
    return [r for r in runs if all(k in r.metrics for k in keys)]


def tradeoff_figure(runs: list[Run], styles: dict[str, Style], x_key: str, y_key: str, ci: Optional[dict] = None):
    """``y_key`` against ``x_key`` in one single-column panel (see :func:`tradeoff`)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(SINGLE_COLUMN, 2.9), layout="constrained")
    tradeoff(ax, _with(runs, x_key, y_key), styles, x_key, y_key, ci)
    legend_below(fig, [ax])
    finish(fig)
    return fig


def frontier_figure(runs: list[Run], styles: dict[str, Style], ci: Optional[dict] = None):
    """Target reward against cross-reward: the over-optimisation frontier (single column)."""
    return tradeoff_figure(runs, styles, _cross_key(runs), TARGET, ci)


def diversity_figure(runs: list[Run], styles: dict[str, Style], ci: Optional[dict] = None):
    """Diversity against target reward (single column)."""
    if not _with(runs, DIVERSITY, TARGET):
        raise MissingInput(f"no run has {DIVERSITY}")
    return tradeoff_figure(runs, styles, TARGET, DIVERSITY, ci)


def overoptimisation_panels(runs: list[Run], styles: dict[str, Style], ci: Optional[dict] = None):
    """The frontier and diversity against target side by side (full width): the README's figure."""
    import matplotlib.pyplot as plt

    cross = _cross_key(runs)
    fig, axes = plt.subplots(1, 2, figsize=(FULL_WIDTH, 2.7), layout="constrained")
    tradeoff(axes[0], _with(runs, cross, TARGET), styles, cross, TARGET, ci)
    tradeoff(axes[1], _with(runs, DIVERSITY, TARGET), styles, TARGET, DIVERSITY, ci)
    legend_below(fig, axes)
    finish(fig)
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


def _conditions(run: Run) -> Optional[list]:
    """The conditions a run cycled over its sample ids (``data.init_args.conditions``, or the prompts of
    ``data.init_args.prompts``: a list, a shipped set or a prompt file; a dataset is not read), or ``None``."""
    from tsf.data.prompts import HF_PREFIX, load_prompts

    conditions = run.settings.get("data.init_args.conditions")
    prompts = run.settings.get("data.init_args.prompts")
    if prompts is not None and not (isinstance(prompts, str) and prompts.startswith(HF_PREFIX)):
        try:
            conditions = load_prompts(prompts)
        except Exception:  # a prompt file moved or removed since the run: the ids stay
            conditions = None
    return list(conditions) if isinstance(conditions, (list, tuple)) and conditions else None


def condition_label(condition, sample_id: int, width_in: float, font_pt: float = 5.0, lines: int = 3) -> str:
    """A grid column's heading: ``class 3`` for a class, a prompt wrapped to the column (at most ``lines``
    lines, cut with an ellipsis), ``id 7`` for no condition."""
    import textwrap

    if condition is None:
        return f"id {sample_id}"
    if isinstance(condition, (int, np.integer)) and not isinstance(condition, bool):
        return f"class {condition}"
    chars = max(6, int(width_in * 72 / (0.55 * font_pt)))
    wrapped = textwrap.wrap(str(condition), chars) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][:chars - 1].rstrip() + "…"
    return "\n".join(wrapped)


def column_labels(ids: list[int], runs: list[Run], width_in: float) -> list[str]:
    """Each grid column's heading: its sample id's condition (class or prompt) where the runs of the rows
    agree on it (their configs' conditions cycled over the ids), else the id."""
    known = [c for c in map(_conditions, runs) if c is not None]
    labels = []
    for i in ids:
        found = {repr(c[i % len(c)]) for c in known}
        labels.append(condition_label(known[0][i % len(known[0])], i, width_in) if len(found) == 1 else f"id {i}")
    return labels


def grids_figure(runs: list[Run], styles: dict[str, Style], num_samples: int = 10,
                 note: Callable[[str], None] = print):
    """One row per method (its largest-NFE run), the same sample ids in every row (full width), each column
    headed by its condition (a class, a prompt)."""
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
            heads = column_labels(ids.tolist(), [r for _, r, _ in rows], FULL_WIDTH * 0.82 / n)
            ax.set_xticklabels(heads, **({"fontsize": 5} if any("\n" in h or len(h) > 8 for h in heads) else {}))
            ax.xaxis.set_ticks_position("top")
        ax.set_yticks([])
        nfe = f"\nNFE {r.nfe:.0f}" if np.isfinite(r.nfe) else ""
        color = as_style(styles[m]).color
        label = ax.set_ylabel(f"{m}{nfe}", rotation=0, ha="right", va="center", color=color)
        tag(label, m)
        for spine in ax.spines.values():
            spine.set_color(color)
    return fig


def smc_figure(runs: list[Run], styles: dict[str, Style]):
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
        style = as_style(styles[m])
        for j, r in enumerate(group):
            ess = r.diagnostics["ess_fraction"].double().numpy()
            steps = np.arange(1, ess.shape[1] + 1)
            legend = m if len(group) == 1 else f"{m}, NFE {r.nfe:.0f}"
            ls = ["-", "--", ":", "-."][j % 4]
            every = max(1, len(steps) // 10)  # markers on at most about ten steps
            (ln,) = axes[0].plot(steps, ess.mean(0), color=style.color, marker=style.marker, markevery=every, ls=ls,
                                 label=legend)
            q10, q90 = np.quantile(ess, [0.1, 0.9], axis=0)
            tag([ln, axes[0].fill_between(steps, q10, q90, color=style.color, alpha=0.15, linewidth=0)], m)
            (ln,) = axes[1].plot(steps, r.diagnostics["resampled"].double().mean(0).numpy(), color=style.color,
                                 ls=ls, marker=style.marker, markevery=every, label=legend)
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


def build(name: str, runs: list[Run], styles: dict[str, Style], ci: dict, grid_samples: int, note,
          x_key: str = "compute/nfe"):
    """The named figure (a matplotlib Figure); :class:`MissingInput` when the runs lack its inputs."""
    if name == "scaling":
        return scaling_figure(runs, styles, ci, x_key)
    if name == "frontier":
        return frontier_figure(runs, styles, ci)
    if name == "diversity":
        return diversity_figure(runs, styles, ci)
    if name == "overoptimisation":
        return overoptimisation_panels(runs, styles, ci)
    if name == "grids":
        return grids_figure(runs, styles, grid_samples, note)
    if name == "smc_diagnostics":
        return smc_figure(runs, styles)
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
    styles = method_styles((r.label for r in runs), {r.label: r.default for r in runs if r.default})
    written = []
    with style():
        for name in only or FIGURES:
            try:
                fig = build(name, runs, styles, ci or {}, grid_samples, note, x_key)
            except MissingInput as why:
                note(f"note: {name} skipped: {why}")
                continue
            written += save_figure(fig, Path(out) / f"{prefix}{name}", formats, dpi)
    return written


def main(argv=None) -> None:
    p = ToolParser(prog="tsf figures", description=__doc__.split("\n\n")[1].replace("\n", " "))
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
    p.add_argument("--labels", nargs="+", default=None, metavar="KEY=LABEL",
                   help="legend labels: KEY=LABEL pairs, a JSON object or a JSON/YAML file of them; KEY is a run "
                        "directory (as given, or its name), a default label or a method (runs given one label are "
                        "one curve); a run's config.yaml may also carry `label: ...`")
    p.add_argument("--wandb_project", default=None,
                   help="also draw the runs of this wandb project (entity/project; needs network and a login)")
    args = p.parse_args(argv)
    if not 0 < args.level < 1 or args.bootstrap < 1:
        p.error("--level must be in (0, 1) and --bootstrap >= 1")
    for d in args.run_dirs:
        if not d.exists():
            print(f"note: {d} does not exist; left out")
    runs = load_runs(d for d in args.run_dirs if d.is_dir())
    try:
        if args.wandb_project:
            runs = distinct_labels(runs + wandb_runs(args.wandb_project))
        keys = {k for r in runs
                for k in ([str(r.path), r.path.name] if r.path else []) + [r.label, method_key(r.label)]}
        runs = relabel(runs, parse_labels(args.labels, keys))
    except ConfigError as err:
        sys.exit(f"tsf figures: error: {err}")
    if not runs:
        sys.exit("tsf figures: error: no run directory (metrics.json or val_metrics.jsonl) among the arguments")
    ci = {"num_resamples": args.bootstrap, "level": args.level, "seed": args.seed}
    written = make_figures(runs, args.out, args.only, args.prefix, ci, args.grid_samples, args.formats, args.dpi,
                           x_key=f"compute/{args.x}")
    print(f"{len(runs)} runs, {len(by_method(runs))} methods; wrote:")
    print("\n".join(f"  {p}" for p in written))
