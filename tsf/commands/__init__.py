"""The ``tsf`` command's entry point and the tools beside the LightningCLI subcommands (``sample``, ``finetune``,
``fit``): one module per tool, each with its ``main(argv)`` (the table in :data:`TOOLS`).

This module imports nothing heavy: ``tsf --version``, ``tsf --help``, ``tsf help``, a tool's ``--help`` and the
config errors found before parsing (an unknown command, a config file that does not exist or does not parse)
answer without importing torch or Lightning; only a LightningCLI subcommand imports :mod:`tsf.cli`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

#: ``tsf <tool> ...`` commands that are not LightningCLI subcommands: name -> "module:function"
TOOLS = {"pretrain": "tsf.commands.pretrain:main", "table": "tsf.commands.table:main", "compare": "tsf.commands.compare:main",
         "scaling": "tsf.commands.scaling:main", "sweep": "tsf.commands.sweep:main", "overopt": "tsf.commands.overopt:main",
         "claims": "tsf.commands.claims:main", "bench": "tsf.commands.bench:main", "figures": "tsf.commands.figures:main"}

#: every ``tsf`` command with its one line (``tsf --help``)
COMMANDS = {
    "sample": "sample with a config's sampler, evaluate, write a run directory (the main command)",
    "finetune": "fine-tune a LoRA baseline (DDPO, DRaFT; configs/finetune/*.yaml): Lightning fit",
    "fit": "train a LightningModule from a config (e.g. SVDD-MC's value network: configs/digits/value.yaml)",
    "validate": "Lightning's validate subcommand",
    "test": "Lightning's test subcommand",
    "predict": "Lightning's predict subcommand",
    "pretrain": "the recipe that makes the embedded digits models",
    "table": "the results table (markdown) of run directories",
    "compare": "run several sampling configs and print one table",
    "scaling": "methods at equal NFE budgets: runs, a table and a plot",
    "sweep": "run a wandb sweep file here, offline, without an account (grid, or seeded random draws)",
    "overopt": "the over-optimisation comparison: fine-tuning against test-time samplers, one figure",
    "claims": "the papers' headline claims re-tested on the digits tasks: runs, uncertainties, verdicts",
    "bench": "framework overhead, throughput, memory, tsf against diffusers on a pipeline, every family on a GPU",
    "figures": "paper figures from run directories",
}


def overview() -> str:
    from tsf import __version__

    width = max(map(len, COMMANDS))
    lines = [f"usage: tsf <command> [options]      (tsf {__version__}; `tsf <command> --help` for a command's options)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {line}" for name, line in COMMANDS.items()]
    lines += ["", "`tsf help` is the same list, `tsf help <command>` a command's options; `python -m tsf` is the same "
                  "program; `tsf --version` prints the version.",
              "Every yes/no option takes `--flag`, `--flag true` or `--flag false`."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- yes/no flags
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def bool_value(text: str) -> bool:
    """``true``/``false`` (also yes/no, on/off, 1/0, any case) as a bool."""
    low = str(text).lower()
    if low in TRUE or low in FALSE:
        return low in TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def bare_flags(argv: Sequence[str], flags: set[str]) -> list[str]:
    """``argv`` with each yes/no flag in ``flags`` written ``--flag=value``: ``--flag true`` (or false) joins its
    value, a bare ``--flag`` becomes ``--flag=true``. Every parser of tsf then reads the same three spellings,
    and a bare flag never takes the next positional argument as its value."""
    out, i = [], 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return out + argv[i:]
        if a in flags:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and nxt.lower() in TRUE + FALSE:
                out.append(f"{a}={nxt}")
                i += 2
                continue
            a = f"{a}=true"
        out.append(a)
        i += 1
    return out


class ToolParser(argparse.ArgumentParser):
    """``argparse`` for the tools, with tsf's one flag style: an ``action="store_true"`` option accepts
    ``--flag``, ``--flag true`` and ``--flag false`` (as the LightningCLI subcommands do)."""

    def add_argument(self, *args, **kwargs):
        if kwargs.get("action") == "store_true":
            kwargs.update(action="store", nargs="?", const=True, type=bool_value, metavar="true|false")
            kwargs.setdefault("default", False)
        return super().add_argument(*args, **kwargs)

    def _flags(self) -> set[str]:
        return {s for a in self._actions if a.type is bool_value for s in a.option_strings}

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(bare_flags(args, self._flags()), namespace)


# ----------------------------------------------------------------------------- the entry point
#: the LightningCLI subcommands (:mod:`tsf.cli`)
LIGHTNING_COMMANDS = ("sample", "finetune", "fit", "validate", "test", "predict")


def config_problem(argv: Sequence[str]) -> Optional[str]:
    """A configuration error that needs no parser (so none of torch or Lightning): an unknown command, or a
    ``--config`` file that does not exist or is not YAML. ``None`` when there is none."""
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):  # options before the command: LightningCLI's
        return f"unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} (`tsf --help` says what each does)"
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        if not os.path.exists(path) and (path.lstrip().startswith(("{", "[")) or ": " in path or "\n" in path):
            continue  # a config given inline (jsonargparse reads YAML text too)
        if not os.path.isfile(path):
            return f"config file {path!r} does not exist (relative paths start at {os.getcwd()})"
        import yaml

        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            return f"config file {path!r} is not valid YAML{line}: {getattr(err, 'problem', None) or err}"
    return None


def light_command(argv: list[str]) -> bool:
    """Run what needs no LightningCLI (help, the version, the tools, a config error found early); ``False``
    when ``argv`` is a LightningCLI subcommand for :mod:`tsf.cli`."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        return True
    if argv[0] in ("-V", "--version"):
        from tsf import __version__

        print(f"tsf {__version__}")
        return True
    if argv[0] in TOOLS:  # the argparse tools beside the LightningCLI subcommands
        import importlib

        module, function = TOOLS[argv[0]].split(":")
        getattr(importlib.import_module(module), function)(argv[1:])
        return True
    problem = config_problem(argv)
    if problem is not None:
        print(f"tsf: error: {problem}", file=sys.stderr)
        sys.exit(2)
    return False


def main(argv: Optional[list[str]] = None) -> None:
    """The ``tsf`` command (and ``python -m tsf``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["help"] and len(args) > 1:  # tsf help <command>: that command's options
        argv = args = [args[1], "--help"]
    try:
        if not light_command(args):
            from tsf.cli import main as lightning_main

            lightning_main(argv)
        sys.stdout.flush()
    except BrokenPipeError:  # `tsf ... | head`: the reader left; say nothing more (Python's documented recipe)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
