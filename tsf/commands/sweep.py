"""``tsf sweep SWEEP.yaml``: run a wandb sweep file here, without a wandb account or a network.

The runs are drawn by wandb's own sweep engine (the ``sweeps`` package of ``wandb[sweeps]``, which runs
offline): ``grid`` gives every configuration, ``random`` and ``bayes`` ``--count`` draws from the
file's distributions with ``--seed`` (the same seed, the same draws). Each configuration runs as the file's
``command`` would under ``wandb agent`` (``tsf sample ...`` or ``tsf finetune ...`` with ``--key=value``
for each parameter) in its own process and its own run directory under ``--output_dir`` (the run names
carry what each configuration changed, so no two share one), one after another or ``--processes`` at a
time. Every run is started with ``--resume true``: a finished run is kept, a stopped one finished, so
the same command resumes a sweep. Its runs' wandb group is the sweep's name (the file's ``name``, else the
file's stem) and they carry the tag ``sweep``, so that after ``wandb sync`` they appear together. A ``bayes`` sweep runs one configuration at a time, each drawn by
the engine from the metric (the file's ``metric.name``) of the runs before it, read from their run
directories.
"""

from __future__ import annotations

import json
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import yaml

from tsf.commands import ToolParser
from tsf.commands.compare import interrupted, run_tsf, tool_command
from tsf.commands.table import results_table
from tsf.errors import ConfigError
from tsf.tracking import sweep_environment


def _engine():
    import warnings

    try:
        with warnings.catch_warnings():  # the engine's pydantic v1-style config keys warn on import
            warnings.simplefilter("ignore", UserWarning)
            import sweeps
    except ImportError as err:
        raise ConfigError("tsf sweep draws runs with wandb's sweep engine: pip install 'wandb[sweeps]' "
                          "(the test extra has it)") from err
    return sweeps


def expand(spec: dict, count: Optional[int] = None, seed: int = 0,
           score: Optional[Callable[[dict[str, Any]], Optional[float]]] = None) -> list[dict[str, Any]]:
    """The configurations of a sweep (parameter -> value), drawn by wandb's sweep engine: every grid
    point (at most ``count`` when given), or ``count`` draws (default 10) of a random or bayes sweep,
    seeded by ``seed``. A bayes sweep draws each configuration from the metrics of the ones before it:
    ``score(params)`` runs one and returns its metric (``None``: the run failed)."""
    sweeps = _engine()
    method = spec.get("method")
    if method not in ("grid", "random", "bayes"):
        raise ConfigError(f"sweep method must be grid, random or bayes, got {method!r}")
    if method == "bayes" and score is None:
        raise ConfigError("a bayes sweep draws each configuration from the results of the ones before: it needs them run")
    state = random.getstate()  # the engine draws with Python's random (and numpy's, for bayes): seeded here
    np_state = np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        runs: list = []
        limit = count if count is not None else (None if method == "grid" else 10)
        while limit is None or len(runs) < limit:
            nxt = sweeps.next_run(spec, runs, validate=True)
            if nxt is None:  # the grid is exhausted
                break
            value = score({k: v["value"] for k, v in nxt.config.items()}) if method == "bayes" else 0.0
            nxt.state = sweeps.RunState.finished if value is not None else sweeps.RunState.failed
            if method == "bayes":
                nxt.summary_metrics = {} if value is None else {spec["metric"]["name"]: float(value)}
            runs.append(nxt)
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
    return [{k: v["value"] for k, v in r.config.items()} for r in runs]


def run_metric(run_dir: Optional[Path], name: str) -> Optional[float]:
    """A finished run's value of the sweep's metric: ``metrics.json`` (a sampling run), or the last row of
    ``val_metrics.jsonl`` for ``val/<key>`` (a fine-tuning run); ``None`` when it has none."""
    if run_dir is None:
        return None
    if (run_dir / "metrics.json").is_file():
        value = json.loads((run_dir / "metrics.json").read_text()).get(name)
    elif (run_dir / "val_metrics.jsonl").is_file():
        rows = [json.loads(x) for x in (run_dir / "val_metrics.jsonl").read_text().splitlines() if x.strip()]
        value = rows[-1].get(name.removeprefix("val/")) if rows else None
    else:
        value = None
    return None if value is None or not np.isfinite(value) else float(value)


def _arg(value: Any) -> str:
    """A parameter value as ``${args}`` would pass it, in the form the config parser reads."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def command_args(spec: dict, params: dict[str, Any]) -> tuple[str, list[str]]:
    """The tsf subcommand of the sweep's ``command`` and one configuration's arguments (``--key=value``,
    ``${args}`` in place, but ``--config`` first: the parser reads a config file before the keys it sets)."""
    command = [str(c) for c in spec.get("command") or ["tsf", "sample", "${args}"]]
    if command[0] != "tsf" or "${args}" not in command or len(command) < 3:
        raise ConfigError(f"tsf sweep runs commands of the form [tsf, <command>, ..., ${{args}}], got {command}")
    sub, fixed = command[1], [c for c in command[2:] if c != "${args}"]
    if sub not in ("sample", "finetune"):
        raise ConfigError(f"tsf sweep runs `tsf sample` or `tsf finetune` sweeps, got `tsf {sub}`")
    first = [f"--config={params['config']}"] if "config" in params else []
    return sub, [*first, *fixed, *(f"--{k}={_arg(v)}" for k, v in params.items() if k != "config")]


def main(argv=None) -> None:
    p = ToolParser(prog="tsf sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", type=Path, help="a wandb sweep file (sweeps/*.yaml)")
    p.add_argument("--output_dir", type=Path, default=None, help="where the runs go (default: runs/sweep_<file name>)")
    p.add_argument("--count", type=int, default=None,
                   help="random, bayes: how many draws (default 10); grid: at most this many")
    p.add_argument("--seed", type=int, default=0, help="the seed of a random or bayes sweep's draws")
    p.add_argument("--processes", type=int, default=1, help="runs at a time, each in its own process")
    p.add_argument("--overwrite", action="store_true", help="run every configuration again (default: keep finished runs)")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    argv = list(sys.argv[2:] if argv is None else argv)
    args = p.parse_args(argv)
    try:
        spec = yaml.safe_load(args.sweep.read_text())
        if spec.get("method") == "bayes" and not spec.get("metric", {}).get("name"):
            raise ConfigError("a bayes sweep needs metric.name")
    except (ConfigError, OSError, ValueError) as err:
        sys.exit(f"tsf sweep: error: {err}")
    out = args.output_dir or Path("runs") / f"sweep_{args.sweep.stem}"
    name = str(spec.get("name") or args.sweep.stem)  # its runs' wandb group

    def run(params: dict[str, Any], log: Optional[Path] = None) -> Optional[Path]:
        sub, cmd = command_args(spec, params)
        if args.dry_run:
            print(" ".join(["tsf", sub, f"--output_dir={out}", *cmd]))
            return None
        return run_tsf(sub, out, *cmd, overwrite=args.overwrite, log=log, resume=tool_command("sweep", argv),
                       env=sweep_environment(name))

    try:
        if spec["method"] == "bayes":  # one after another: each draw needs the metrics of the runs before it
            print(f"{args.sweep}: bayes sweep, {args.count or 10} runs into {out}, one at a time", flush=True)
            dirs: list[Optional[Path]] = []

            def score(params: dict[str, Any]) -> Optional[float]:
                dirs.append(run(params))
                return 0.0 if args.dry_run else run_metric(dirs[-1], spec["metric"]["name"])

            configs = expand(spec, args.count, args.seed, score)
        else:
            configs = expand(spec, args.count, args.seed)
            for c in configs:  # every configuration's command is checked before any runs
                command_args(spec, c)
            print(f"{args.sweep}: {spec['method']} sweep, {len(configs)} runs into {out}", flush=True)
            pool = ThreadPoolExecutor(max(1, args.processes))
            try:
                logs = [None if args.processes == 1 else out / "logs" / f"run{i:03d}.log" for i in range(len(configs))]
                dirs = list(pool.map(run, configs, logs))
            finally:  # on Ctrl-C: no further run starts; the running ones stop at their graceful best
                pool.shutdown(wait=True, cancel_futures=True)
    except ConfigError as err:
        sys.exit(f"tsf sweep: error: {err}")
    except KeyboardInterrupt:
        interrupted("sweep", argv, out)
    if args.dry_run:
        return
    out.mkdir(parents=True, exist_ok=True)
    record = [{"params": c, "run_dir": None if d is None else str(d)} for c, d in zip(configs, dirs)]
    (out / "sweep.json").write_text(json.dumps({"sweep": str(args.sweep), "method": spec["method"], "seed": args.seed,
                                                "runs": record}, indent=2))
    done = [d for d in dirs if d is not None and (d / "metrics.json").is_file()]
    if done:
        print(results_table(done))
    failed = sum(d is None for d in dirs)
    print(f"{len(dirs) - failed} of {len(dirs)} runs finished; figures: tsf figures {out}/* --out {out}/figures")
    if failed:
        sys.exit(f"tsf sweep: {failed} runs failed (the same command retries them, keeping the finished ones)")
