"""``tsf table RUN_DIRS...``: the results table (markdown) from run directories' ``metrics.json``."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Optional

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


def split_passthrough(argv) -> tuple[list[str], list[str]]:
    """``(own arguments, arguments after -- for every tsf sample run)``; ``None`` reads ``sys.argv``."""
    import sys

    argv = list(sys.argv[2:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1:]


def run_tsf(command: str, output_dir: Path, *args: str, overwrite: bool = False,
            log: Optional[Path] = None) -> Optional[Path]:
    """``tsf COMMAND --output_dir DIR --resume=true ARGS`` (``sample`` or ``finetune``) in a fresh process: a
    finished run of the same config is kept (nothing is sampled or trained again), a stopped one is finished,
    one of another config is refused; ``overwrite`` passes ``--overwrite=true`` instead (start again). Its
    output is echoed, or written to ``log``. Returns the run directory, or ``None`` when the run failed."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tsf.cli", command, f"--output_dir={output_dir}",
           "--overwrite=true" if overwrite else "--resume=true", *args]
    print("+", " ".join(["tsf", *cmd[3:]]) + (f"  (log: {log})" if log else ""), flush=True)
    run_dir = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") if log is not None else contextlib.nullcontext() as sink, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sink, text=True, bufsize=1) as proc:
        for line in proc.stdout:  # the last "run directory:" line names the run directory
            print(line, end="", flush=True, file=sink or sys.stdout)
            if line.startswith("run directory: "):
                run_dir = Path(line[len("run directory: "):].strip())
    return run_dir if proc.returncode == 0 else None


OVERWRITE_HELP = "run every config again, replacing its finished run (default: keep finished runs, finish stopped ones)"


def compare(argv=None) -> None:
    """``tsf compare CONFIGS... [--output_dir DIR] [--overwrite] [-- extra tsf sample args]``: run every
    config (finished runs are kept), print the table."""
    import sys

    p = argparse.ArgumentParser(prog="tsf compare", description="Run several sampling configs and print one table.")
    p.add_argument("configs", nargs="+", type=Path)
    p.add_argument("--output_dir", default="runs/compare")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    own, extra = split_passthrough(argv)
    args = p.parse_args(own)
    run_dirs = []
    for cfg in args.configs:
        run_dir = run_tsf("sample", args.output_dir, f"--config={cfg}", *extra, overwrite=args.overwrite)
        if run_dir is None:
            sys.exit(f"tsf compare: {cfg} failed; the table needs every run (--overwrite replaces runs of "
                     "another config)")
        run_dirs.append(run_dir)
    print(results_table(run_dirs))
