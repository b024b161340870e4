"""``tsf compare CONFIGS... [--output_dir DIR] [--overwrite] [--section.key=value ...] [-- extra tsf sample args]``: run several
sampling configs (finished runs are kept) and print one table; and the subprocess runner that ``tsf
scaling`` and ``tsf sweep`` share."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

from tsf.commands import ToolParser
from tsf.commands.table import results_table


def split_passthrough(argv) -> tuple[list[str], list[str]]:
    """``(own arguments, arguments for every tsf sample run)``; ``None`` reads ``sys.argv``. Passed through are
    everything after ``--`` and every config override before it: an option with a dot in its name
    (``--data.init_args.num_samples=50``, or ``--trainer.devices 2`` with its value)."""
    import sys

    argv = list(sys.argv[2:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        argv, rest = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    own, extra, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "." in a.split("=", 1)[0]:
            extra.append(a)
            if "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                extra.append(argv[i + 1])
                i += 1
        else:
            own.append(a)
        i += 1
    return own, extra + rest


def run_tsf(command: str, output_dir: Path, *args: str, overwrite: bool = False,
            log: Optional[Path] = None, resume: Optional[str] = None,
            env: Optional[dict] = None) -> Optional[Path]:
    """``tsf COMMAND --output_dir DIR --resume=true ARGS`` (``sample`` or ``finetune``) in a fresh process: a
    finished run of the same config is kept (nothing is sampled or trained again), a stopped one is finished,
    one of another config is refused; ``overwrite`` passes ``--overwrite=true`` instead (start again). Its
    output is echoed, or written to ``log``; ``resume`` is the command that continues the whole (the run says
    it after Ctrl-C); ``env`` adds to its environment. Returns the run directory, or ``None`` when the run failed or was stopped. On Ctrl-C
    (which the run receives too and stops at its graceful best) it waits for the run to stop, then raises
    ``KeyboardInterrupt``."""
    import os
    import subprocess
    import sys

    from tsf.cli import RESUME_ENV

    cmd = [sys.executable, "-m", "tsf", command, f"--output_dir={output_dir}",
           "--overwrite=true" if overwrite else "--resume=true", *args]
    print("+", " ".join(["tsf", *cmd[3:]]) + (f"  (log: {log})" if log else ""), flush=True)
    run_dir, stopped = None, False
    env = {**os.environ, **({RESUME_ENV: resume} if resume else {}), **(env or {})}
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") if log is not None else contextlib.nullcontext() as sink, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sink, text=True, bufsize=1, env=env) as proc:
        while True:
            try:
                for line in proc.stdout:  # the last "run directory:" line names the run directory
                    print(line, end="", flush=True, file=sink or sys.stdout)
                    if line.startswith("run directory: "):
                        run_dir = Path(line[len("run directory: "):].strip())
                proc.wait()
                break
            except KeyboardInterrupt:  # the run got the same Ctrl-C: let it stop and say what it kept
                stopped = True
    if stopped:
        raise KeyboardInterrupt
    return run_dir if proc.returncode == 0 else None


def tool_command(tool: str, argv: list[str]) -> str:
    """``tsf TOOL ARGV`` without ``--overwrite``: the command that continues an interrupted ``tsf compare``,
    ``scaling`` or ``sweep`` (finished runs are kept, a stopped one is finished)."""
    import shlex

    return shlex.join(["tsf", tool, *(a for a in argv if a != "--overwrite")])


def interrupted(tool: str, argv: list[str], output_dir: Path) -> None:
    """After Ctrl-C: what was kept and the command that continues, and exit code 130 (no traceback)."""
    import sys

    from tsf.cli import INTERRUPTED

    out = Path(output_dir)
    done = sum((d / "metrics.json").is_file() for d in out.iterdir()) if out.is_dir() else 0
    print(f"\ntsf {tool}: interrupted; {done} finished runs are kept in {out} (a stopped run keeps its finished "
          f"batches). Continue with:\n  {tool_command(tool, argv)}", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED)


OVERWRITE_HELP = "run every config again, replacing its finished run (default: keep finished runs, finish stopped ones)"


def main(argv=None) -> None:
    """``tsf compare CONFIGS... [--output_dir DIR] [--overwrite] [-- extra tsf sample args]``: run every
    config (finished runs are kept), print the table."""
    import sys

    p = ToolParser(prog="tsf compare", description="Run several sampling configs and print one table.")
    p.add_argument("configs", nargs="+", type=Path)
    p.add_argument("--output_dir", default="runs/compare")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    argv = list(sys.argv[2:] if argv is None else argv)
    own, extra = split_passthrough(argv)
    args = p.parse_args(own)
    run_dirs = []
    for cfg in args.configs:
        try:
            run_dir = run_tsf("sample", args.output_dir, f"--config={cfg}", *extra, overwrite=args.overwrite,
                              resume=tool_command("compare", argv))
        except KeyboardInterrupt:
            interrupted("compare", argv, args.output_dir)
        if run_dir is None:
            sys.exit(f"tsf compare: {cfg} failed; the table needs every run (--overwrite replaces runs of "
                     "another config)")
        run_dirs.append(run_dir)
    print(results_table(run_dirs))
