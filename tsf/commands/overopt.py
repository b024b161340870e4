"""``tsf overopt``: the over-optimisation figure of the DAS paper on digits. It fine-tunes DDPO and
DRaFT (``configs/finetune/``), runs the test-time samplers of ``configs/overopt/`` on the same base
model, reward, evaluator, sample ids and seed, and plots target reward against cross-reward and
diversity against target: the fine-tuning curves over training steps, the samplers as points.

``tsf overopt --flow`` draws the same figure for the digits flow model (DigitsFlow, Linear-SDE, T = 10):
DRaFT, DDPO and GRPO (``configs/finetune/*_flow.yaml``) against the samplers of ``configs/overopt_flow/``
(docs/algorithms.md, section 6).

``tsf overopt --domain hard`` runs the same comparison on the hard digits task (the MLP's log-odds of a 3,
``configs/overopt_hard`` and ``configs/finetune/*_hard.yaml``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tsf.commands import ToolParser
from tsf.commands.compare import main as compare
from tsf.commands.compare import run_tsf
from tsf.commands.figures import (Run, _cross_key, load_runs, method_styles, overoptimisation_panels, save_figure,
                                  style)
from tsf.commands.table import mean_se, standard_error


def overoptimisation_figure(curves: dict[str, list[dict]], points: dict[str, dict], out: Path) -> list[Path]:
    """The over-optimisation figure from numbers alone: fine-tuning ``curves`` (validation rows with
    ``step``) and sampler ``points`` (metrics) by method; writes ``out.png`` and ``out.pdf``."""
    runs = [Run(None, m, "fine-tuning", rows[-1], rows) for m, rows in curves.items()]
    runs += [Run(None, m, "sampler", metrics) for m, metrics in points.items()]
    return save_overoptimisation(runs, out)


def save_overoptimisation(runs: list[Run], out: Path) -> list[Path]:
    """The over-optimisation panels of ``runs`` to ``out.png`` and ``out.pdf``."""
    with style():
        return save_figure(overoptimisation_panels(runs, method_styles(r.label for r in runs)), out)


#: per domain: the samplers' config folder, the fine-tuning configs (configs/finetune/<name>.yaml), the default
#: output directory and figure name
DOMAINS = {
    "diffusion": ("overopt", ("draft", "ddpo"), "runs/overopt", "overoptimisation"),
    "flow": ("overopt_flow", ("draft_flow", "ddpo_flow", "grpo_flow"), "runs/overopt_flow", "overoptimisation_flow"),
    "hard": ("overopt_hard", ("draft_hard", "ddpo_hard"), "runs/overopt_hard", "overoptimisation_hard"),
}


def nfe_cell(r: Run) -> str:
    """A row's NFE per sample: a sampler's counted NFE (and backward passes), a fine-tuned model's T (one
    base-sampler trajectory per sample)."""
    if r.is_finetune:
        steps = r.settings.get("model.init_args.base.init_args.num_steps")
        return "" if steps is None else f"{steps}"
    grad = float(r.metrics.get("compute/nfe_grad", 0.0))
    return f"{r.nfe:.0f}" + (f" (+{grad:.0f} backward)" if grad else "")


def main(argv=None) -> None:
    p = ToolParser(prog="tsf overopt", description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--domain", choices=sorted(DOMAINS), default="diffusion", help="diffusion (configs/overopt and "
                   "configs/finetune/{draft,ddpo}.yaml), flow (configs/overopt_flow, configs/finetune/*_flow.yaml) or "
                   "hard (the hard digits task: configs/overopt_hard, configs/finetune/*_hard.yaml)")
    p.add_argument("--flow", action="store_true", help="the same as --domain flow")
    p.add_argument("--output_dir", type=Path, default=None, help="default: runs/overopt, runs/overopt_flow or "
                   "runs/overopt_hard by domain")
    p.add_argument("--figure", type=Path, default=None, help="figure path without suffix (default: "
                   "OUTPUT_DIR/overoptimisation, _flow or _hard by domain)")
    p.add_argument("--skip_runs", action="store_true", help="only redraw from existing run directories")
    args = p.parse_args(argv)
    samplers, tunes, default_dir, figure_name = DOMAINS["flow" if args.flow else args.domain]
    out = args.output_dir or Path(default_dir)
    root = Path(__file__).resolve().parents[2] / "configs"
    if not args.skip_runs:
        for m in tunes:  # run_tsf resumes: a finished fine-tuning run is kept, a stopped one continued
            if run_tsf("finetune", out, f"--config={root / f'finetune/{m}.yaml'}") is None:
                sys.exit(f"tsf overopt: fine-tuning {m} failed")
        compare([*map(str, sorted((root / samplers).glob("*.yaml"))), "--output_dir", str(out), "--",
                 "--wandb_mode=disabled"])  # exits, saying which, if a sampler fails
    runs = load_runs([*sorted(out.glob("*_K*")), *(out / f"finetune_{m}" for m in tunes)])
    if not runs:
        sys.exit(f"tsf overopt: no runs in {out} (run it without --skip_runs first)")
    fig = args.figure or out / figure_name
    save_overoptimisation(runs, fig)
    cross = _cross_key(runs)
    def mean(r: Run, key: str) -> str:  # the mean, with its standard error where samples.pt has the per-sample values
        v = r.per_sample(key)
        se = None if v is None else standard_error(v)
        return f"{r.metrics[key]:.3f}" if se is None else mean_se(r.metrics[key], se)

    lines = ["| method | target mean ± s.e. | cross mean ± s.e. | diversity pairwise | vendi | fd | NFE |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        name, m = (f"{r.label} step {r.metrics['step']}", r.metrics) if r.is_finetune else (r.label, r.metrics)
        lines.append(f"| {name} | {mean(r, 'target/mean')} | {mean(r, cross)} | {m['diversity/pairwise']:.3f} | "
                     f"{m['diversity/vendi']:.2f} | {m.get('fidelity/fd', float('nan')):.2f} | {nfe_cell(r)} |")
    print("\n".join(lines))
    print(f"figure: {fig}.png (and .pdf)")
