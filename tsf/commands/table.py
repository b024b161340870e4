"""``tsf table RUN_DIRS...``: the results table (markdown) from run directories' ``metrics.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [("target/mean", "target mean"), ("target/median", "target median"), ("target/q90", "target q90"),
           ("cross/*", "cross {} mean"), ("diversity/pairwise", "diversity pairwise"),
           ("diversity/vendi", "vendi"), ("fidelity/fd", "fd"), ("compute/nfe", "NFE"),
           ("compute/nfe_grad", "NFE grad"), ("compute/seconds", "s / sample")]


def _fmt(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.4g}"


def run_labels(run_dirs: list[Path]) -> list[str]:
    """A row label per run: its directory's name; runs that share a name get the settings in which their
    resolved configs differ appended (:func:`tsf.identity.distinguishing_labels`), or, the same config,
    their parent directory."""
    import yaml

    from tsf.identity import distinguishing_labels, method_identity

    names = [Path(d).name for d in run_dirs]
    configs = [Path(d) / "config.yaml" for d in run_dirs]
    identities = [method_identity(yaml.safe_load(c.read_text()) or {}) if c.is_file() else {} for c in configs]
    labels = distinguishing_labels(names, identities)
    return [f"{label} ({Path(d).parent.name})" if labels.count(label) > 1 else label
            for label, d in zip(labels, run_dirs)]


def results_table(run_dirs: list[Path]) -> str:
    runs = [(label, json.loads((Path(d) / "metrics.json").read_text()))
            for label, d in zip(run_labels(run_dirs), run_dirs)]
    cross = sorted({k for _, m in runs for k in m if k.startswith("cross/")})
    keys, heads = [], ["run"]
    for key, head in COLUMNS:
        if key == "cross/*":
            keys += cross
            heads += [head.format(k.split("/")[1]) for k in cross]
        elif any(key in m for _, m in runs):
            keys.append(key)
            heads.append(head)
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name, m in runs:
        lines.append("| " + " | ".join([name] + [_fmt(m[k]) if k in m else "" for k in keys]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="tsf table", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    args = p.parse_args(argv)
    print(results_table([d for d in args.run_dirs if (d / "metrics.json").is_file()]))
