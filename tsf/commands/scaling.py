"""``tsf scaling CONFIGS... --budgets 50 100 200 500``: methods at equal NFE budgets, a table and a plot.

Each config runs once per budget (a finished run is kept, a stopped one finished: the command resumes
a sweep; ``--overwrite`` runs everything again), with its sampler's size set by the sampler's own
``for_budget`` (Best-of-N and SMC: ``N = B / T``; SVDD: ``M = (B - 1) / (T - 1)``; RBF: its
budget), so that every point of a curve spends the same NFE per sample as the others at
that budget. The figure (PNG and PDF; ``tsf figures`` draws the same from the run directories)
plots target reward, cross-reward and diversity against the NFE counted per sample, with
bootstrap confidence bands.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Optional

import yaml

from tsf.commands import ToolParser
from tsf.commands.compare import OVERWRITE_HELP, interrupted, run_tsf, split_passthrough, tool_command
from tsf.commands.table import results_table


def _resolve(class_path: str):
    import importlib

    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def budget_overrides(config: Path, budget: int, steps: Optional[int] = None) -> list[str]:
    """Command-line overrides that size the config's sampler for ``budget`` NFE per sample (at the config's
    number of steps, or at ``steps`` where the command line changes it)."""
    cfg = yaml.safe_load(Path(config).read_text())
    init = cfg["model"]["init_args"]
    base_cls = _resolve(init["base"]["class_path"])
    if steps is None:
        steps = (init["base"].get("init_args") or {}).get("num_steps")
    if steps is None:
        steps = inspect.signature(base_cls.__init__).parameters["num_steps"].default
    sampler_cls = _resolve(init["sampler"]["class_path"])
    return [f"--model.init_args.sampler.init_args.{k}={v}" for k, v in sampler_cls.for_budget(budget, steps).items()]


def run_name(config: Path, budget: int, overrides: list[str]) -> str:
    """``<config name>_nfe<budget>``, then the settings the overrides change (``num_samples=50``), within
    :data:`tsf.cli.RUN_NAME_LEN` characters as a default run name shows them."""
    from tsf.cli import default_run_name
    from tsf.identity import overrides_variant

    return default_run_name(f"{Path(config).stem}_nfe{budget}", overrides_variant(overrides))


def plot(run_dirs: list[Path], out: Path) -> list[Path]:
    """The scaling figure of :mod:`tsf.commands.figures` (bootstrap bands, the shared method colours) at ``out.{png,pdf}``."""
    from tsf.commands.figures import load_runs, method_styles, save_figure, scaling_figure, style

    runs = load_runs(run_dirs)
    with style():
        return save_figure(scaling_figure(runs, method_styles(r.label for r in runs)), out)


def main(argv=None) -> None:
    p = ToolParser(prog="tsf scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", type=Path)
    p.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 200, 500])
    p.add_argument("--output_dir", type=Path, default=Path("runs/scaling"))
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    argv = list(sys.argv[2:] if argv is None else argv)
    own, extra = split_passthrough(argv)
    args = p.parse_args(own)
    rows, dirs = [], []
    for cfg in args.configs:
        for b in args.budgets:
            name = run_name(cfg, b, extra)
            try:
                done = run_tsf("sample", args.output_dir, f"--config={cfg}", f"--run_name={name}",
                               *budget_overrides(cfg, b), *extra, overwrite=args.overwrite,
                               resume=tool_command("scaling", argv))
            except KeyboardInterrupt:
                interrupted("scaling", argv, args.output_dir)
            if done is None:
                sys.exit(f"tsf scaling: {cfg} at budget {b} failed (--overwrite replaces runs of another config)")
            metrics = json.loads((args.output_dir / name / "metrics.json").read_text())
            rows.append({"method": cfg.stem, "budget": b, "metrics": metrics})
            dirs.append(args.output_dir / name)
    table = results_table(dirs)
    (args.output_dir / "scaling.md").write_text(table + "\n")
    (args.output_dir / "scaling.json").write_text(json.dumps(rows, indent=2))
    plot(dirs, args.output_dir / "scaling")
    print(table)
    print(f"figure: {args.output_dir / 'scaling.png'} (and .pdf)")
