"""``tsf overopt``: the over-optimisation figure of the DAS paper on digits. It fine-tunes DDPO and
DRaFT (``configs/finetune/``), runs the test-time samplers of ``configs/overopt/`` on the same base
model, reward, evaluator, sample ids and seed, and plots target reward against cross-reward and
diversity against target: the fine-tuning curves over training steps, the samplers as points.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from tsf.commands.figures import (Run, _cross_key, load_runs, method_colors, overoptimisation_panels, save_figure,
                                  style)


def overoptimisation_figure(curves: dict[str, list[dict]], points: dict[str, dict], out: Path) -> list[Path]:
    """The over-optimisation figure from numbers alone: fine-tuning ``curves`` (validation rows with
    ``step``) and sampler ``points`` (metrics) by method; writes ``out.png`` and ``out.pdf``."""
    runs = [Run(None, m, "fine-tuning", rows[-1], rows) for m, rows in curves.items()]
    runs += [Run(None, m, "sampler", metrics) for m, metrics in points.items()]
    return save_overoptimisation(runs, out)


def save_overoptimisation(runs: list[Run], out: Path) -> list[Path]:
    """The over-optimisation panels of ``runs`` to ``out.png`` and ``out.pdf``."""
    with style():
        return save_figure(overoptimisation_panels(runs, method_colors(r.label for r in runs)), out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="tsf overopt", description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--output_dir", type=Path, default=Path("runs/overopt"))
    p.add_argument("--figure", type=Path, default=None, help="figure path without suffix (default: OUTPUT_DIR/overoptimisation)")
    p.add_argument("--skip_runs", action="store_true", help="only redraw from existing run directories")
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parents[2] / "configs"
    tsf = [sys.executable, "-m", "tsf.cli"]
    if not args.skip_runs:
        for m in ("draft", "ddpo"):  # --resume: a finished fine-tuning run is kept, a stopped one continued
            if subprocess.run([*tsf, "finetune", "--config", str(root / f"finetune/{m}.yaml"),
                               f"--output_dir={args.output_dir}", "--resume=true"]).returncode:
                sys.exit(f"tsf overopt: fine-tuning {m} failed")
        cmd = [*tsf, "compare", *map(str, sorted((root / "overopt").glob("*.yaml"))), "--output_dir",
               str(args.output_dir), "--", "--wandb_mode=disabled"]
        if subprocess.run(cmd).returncode:
            sys.exit("tsf overopt: the samplers failed")
    runs = load_runs([*sorted(args.output_dir.glob("*_K*")), *(args.output_dir / f"finetune_{m}" for m in ("draft", "ddpo"))])
    fig = args.figure or args.output_dir / "overoptimisation"
    save_overoptimisation(runs, fig)
    cross = _cross_key(runs)
    lines = ["| method | target mean | cross mean | diversity pairwise | vendi | fd |", "|---|---|---|---|---|---|"]
    for r in runs:
        name, m = (f"{r.label} step {r.metrics['step']}", r.metrics) if r.is_finetune else (r.label, r.metrics)
        lines.append(f"| {name} | {m['target/mean']:.3f} | {m[cross]:.3f} | {m['diversity/pairwise']:.3f} | "
                     f"{m['diversity/vendi']:.2f} | {m.get('fidelity/fd', float('nan')):.2f} |")
    print("\n".join(lines))
    print(f"figure: {fig}.png (and .pdf)")
