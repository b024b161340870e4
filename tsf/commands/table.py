"""``tsf table RUN_DIRS...``: the results table (markdown) from run directories' ``metrics.json``, each mean
of per-sample values (the target, the cross-rewards) with its standard error from ``samples.pt``."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from tsf.commands import ToolParser

COLUMNS = [("target/mean", "target mean"), ("target/median", "target median"), ("target/q90", "target q90"),
           ("cross/*", "cross {} mean"), ("diversity/pairwise", "diversity pairwise"),
           ("diversity/vendi", "vendi"), ("fidelity/fd", "fd"), ("compute/nfe", "NFE"),
           ("compute/nfe_grad", "NFE grad"), ("compute/seconds", "s / sample")]
SE = " ± s.e."  # appended to the heading of a column whose cells carry standard errors


def _fmt(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.4g}"


def standard_error(values) -> Optional[float]:
    """The standard error of the mean of ``values`` (finite ones; sample standard deviation / sqrt(n)),
    ``None`` for fewer than two."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size >= 2 else None


def mean_se(mean: float, se: Optional[float]) -> str:
    """``mean ± se``, the error to two significant digits and the mean to the same decimal place
    (``-3.512 ± 0.046``); the mean alone (:func:`_fmt`) without an error."""
    if se is None or not math.isfinite(se) or not math.isfinite(mean):
        return _fmt(mean)
    if se == 0:
        return f"{_fmt(mean)} ± 0"
    decimals = max(0, 1 - math.floor(math.log10(se)))
    return f"{mean:.{decimals}f} ± {se:.{decimals}f}"


def run_labels(run_dirs: list[Path], labels: Optional[dict[str, str]] = None) -> list[str]:
    """A row label per run: its directory's name; runs that share a name get the settings in which their
    resolved configs differ appended (:func:`tsf.identity.distinguishing_labels`), or, the same config,
    their parent directory; a ``label:`` in a run's ``config.yaml`` and ``labels`` (``--labels``, as
    :func:`tsf.commands.figures.relabel` matches them) replace these."""
    import yaml

    from tsf.commands.figures import Run, relabel
    from tsf.identity import distinguishing_labels, flatten_config, method_identity

    names = [Path(d).name for d in run_dirs]
    configs = [yaml.safe_load(c.read_text()) or {} if c.is_file() else {} for c in (Path(d) / "config.yaml"
                                                                                     for d in run_dirs)]
    labels_ = distinguishing_labels(names, [method_identity(c) for c in configs])
    labels_ = [f"{label} ({Path(d).parent.name})" if labels_.count(label) > 1 else label
               for label, d in zip(labels_, run_dirs)]
    runs = [Run(Path(d), label, "", {}, settings=flatten_config(c)) for d, label, c in zip(run_dirs, labels_, configs)]
    return [r.label for r in relabel(runs, labels)]


def results_table(run_dirs: list[Path], labels: Optional[dict[str, str]] = None) -> str:
    """One row per run, one column per metric any run has; the target's and the cross-rewards' means
    carry their standard errors (``mean ± s.e.``) where the run's ``samples.pt`` holds the per-sample
    rewards (as the figures' bootstrap bands do)."""
    from tsf.commands.figures import load_run

    runs = [(label, load_run(Path(d))) for label, d in zip(run_labels(run_dirs, labels), run_dirs)]
    cross = sorted({k for _, r in runs for k in r.metrics if k.startswith("cross/")})
    keys, heads = [], ["run"]
    for key, head in COLUMNS:
        if key == "cross/*":
            keys += cross
            heads += [head.format(k.split("/")[1]) for k in cross]
        elif any(key in r.metrics for _, r in runs):
            keys.append(key)
            heads.append(head)
    errors = {(j, k): standard_error(v) for j, (_, r) in enumerate(runs) for k in keys
              if k.endswith("/mean") and k in r.metrics for v in [r.per_sample(k)] if v is not None}
    heads = [h + SE if any(errors.get((j, k)) is not None for j in range(len(runs))) else h
             for h, k in zip(heads, ["run", *keys])]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for j, (name, r) in enumerate(runs):
        m = r.metrics
        lines.append("| " + " | ".join([name] + [mean_se(m[k], errors.get((j, k))) if k in m else ""
                                                   for k in keys]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from tsf.commands.figures import parse_labels
    from tsf.errors import ConfigError

    p = ToolParser(prog="tsf table", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--labels", nargs="+", default=None, metavar="KEY=LABEL",
                   help="row labels, as `tsf figures --labels` takes them")
    args = p.parse_args(argv)
    dirs = [d for d in args.run_dirs if (d / "metrics.json").is_file()]
    try:
        print(results_table(dirs, parse_labels(args.labels, [str(d) for d in dirs] + [d.name for d in dirs])))
    except ConfigError as err:
        sys.exit(f"tsf table: error: {err}")
