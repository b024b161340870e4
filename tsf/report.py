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


def results_table(run_dirs: list[Path]) -> str:
    runs = [(Path(d).name, json.loads((Path(d) / "metrics.json").read_text())) for d in run_dirs]
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


def split_passthrough(argv) -> tuple[list[str], list[str]]:
    """``(own arguments, arguments after -- for every tsf sample run)``; ``None`` reads ``sys.argv``."""
    import sys

    argv = list(sys.argv[2:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1:]


def run_sample(config: Path, output_dir: Path, *args: str) -> bool:
    """``tsf sample --config CONFIG --output_dir DIR --overwrite=true ARGS`` in a fresh process; True on success."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tsf.cli", "sample", "--config", str(config), f"--output_dir={output_dir}",
           "--overwrite=true", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    return subprocess.run(cmd).returncode == 0


def compare(argv=None) -> None:
    """``tsf compare CONFIGS... [--output_dir DIR] [-- extra tsf sample args]``: run every config, print the table."""
    import sys

    p = argparse.ArgumentParser(prog="tsf compare", description="Run several sampling configs and print one table.")
    p.add_argument("configs", nargs="+", type=Path)
    p.add_argument("--output_dir", default="runs/compare")
    own, extra = split_passthrough(argv)
    args = p.parse_args(own)
    run_dirs = []
    for cfg in args.configs:
        before = set(Path(args.output_dir).glob("*")) if Path(args.output_dir).is_dir() else set()
        if not run_sample(cfg, args.output_dir, *extra):
            sys.exit(f"tsf compare: {cfg} failed; the table needs every run")
        new = sorted(set(Path(args.output_dir).glob("*")) - before) or sorted(
            Path(args.output_dir).glob(f"{cfg.stem}_K*"), key=lambda d: d.stat().st_mtime)[-1:]
        run_dirs += new
    print(results_table(run_dirs))
