"""Paper figures from run directories.

``tsf overopt``: the over-optimisation figure of the DAS paper on digits. It fine-tunes DDPO and
DRaFT (``configs/finetune/``), runs the test-time samplers of ``configs/overopt/`` on the same base
model, reward, evaluator, sample ids and seed, and plots target reward against cross-reward and
against diversity: the fine-tuning curves over training steps, the samplers as points.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

COLORS = {"base": "black", "best_of_n": "tab:blue", "svdd_pm": "tab:orange", "das_k4": "tab:green",
          "das_k16": "tab:olive", "draft": "tab:red", "ddpo": "tab:purple"}


def read_curve(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "val_metrics.jsonl").read_text().splitlines() if line]


def overoptimisation_figure(curves: dict[str, list[dict]], points: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cross = next(k for k in next(iter(points.values())) if k.startswith("cross/"))
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 2.9))
    for ax, (key, label) in zip(axes, [(cross, "cross-reward (independent classifier)"),
                                       ("diversity/pairwise", "diversity (pairwise)")]):
        for name, rows in curves.items():
            ax.plot([r[key] for r in rows], [r["target/mean"] for r in rows], marker=".", ms=4,
                    color=COLORS.get(name), label=f"{name} (fine-tuning steps)")
            ax.annotate(str(rows[-1]["step"]), (rows[-1][key], rows[-1]["target/mean"]), fontsize=6)
        for name, m in points.items():
            ax.scatter(m[key], m["target/mean"], marker="*", s=70, color=COLORS.get(name), label=name, zorder=3)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("target reward (mean)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(out.with_suffix(f".{ext}"), dpi=150)
    plt.close(fig)


def overopt(argv=None) -> None:
    p = argparse.ArgumentParser(prog="tsf overopt", description=__doc__.split("\n\n")[1])
    p.add_argument("--output_dir", type=Path, default=Path("runs/overopt"))
    p.add_argument("--figure", type=Path, default=None, help="figure path without suffix (default: OUTPUT_DIR/overoptimisation)")
    p.add_argument("--skip_runs", action="store_true", help="only redraw from existing run directories")
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parents[1] / "configs"
    tsf = [sys.executable, "-m", "tsf.cli"]
    if not args.skip_runs:
        for m in ("draft", "ddpo"):
            if subprocess.run([*tsf, "finetune", "--config", str(root / f"finetune/{m}.yaml")]).returncode:
                sys.exit(f"tsf overopt: fine-tuning {m} failed")
        cmd = [*tsf, "compare", *map(str, sorted((root / "overopt").glob("*.yaml"))), "--output_dir",
               str(args.output_dir), "--", "--wandb_mode=disabled"]
        if subprocess.run(cmd).returncode:
            sys.exit("tsf overopt: the samplers failed")
    curves = {m: read_curve(Path(f"runs/finetune_{m}")) for m in ("draft", "ddpo")}
    points = {}
    for d in sorted(args.output_dir.glob("*_K*")):
        points[d.name.split("_K")[0]] = json.loads((d / "metrics.json").read_text())
    fig = args.figure or args.output_dir / "overoptimisation"
    overoptimisation_figure(curves, points, fig)
    cross = next(k for k in next(iter(points.values())) if k.startswith("cross/"))
    lines = ["| method | target mean | cross mean | diversity pairwise | vendi | fd |", "|---|---|---|---|---|---|"]
    rows = [(n, m) for n, m in points.items()] + [(f"{n} step {c[-1]['step']}", c[-1]) for n, c in curves.items()]
    for name, m in rows:
        lines.append(f"| {name} | {m['target/mean']:.3f} | {m[cross]:.3f} | {m['diversity/pairwise']:.3f} | "
                     f"{m['diversity/vendi']:.2f} | {m.get('fidelity/fd', float('nan')):.2f} |")
    print("\n".join(lines))
    print(f"figure: {fig}.png (and .pdf)")
