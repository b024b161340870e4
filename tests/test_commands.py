"""The ``tsf`` command itself: it answers help, the version and early config errors without importing torch or
Lightning; every yes/no flag of every command takes ``--flag``, ``--flag true`` and ``--flag false``; ``tsf help``
is ``tsf --help``; piped help exits quietly."""

import subprocess
import sys
from pathlib import Path

import pytest

from tsf.commands import COMMANDS, TOOLS, ToolParser, bare_flags, main

ROOT = Path(__file__).resolve().parents[1]


def run_tsf(*args, cwd=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "tsf", *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          **kwargs)


def test_version_help_a_tools_help_and_a_config_error_import_neither_torch_nor_lightning(tmp_path):
    """The structural reason they answer at once (`tsf bench cli` times them): nothing heavy is imported."""
    from tsf.commands.bench import cli_one

    for args in (["--version"], ["--help"], ["help"], *([t, "--help"] for t in sorted(TOOLS)),
                 ["sample", "--config", "missing.yaml"], ["smaple"]):
        row = cli_one(args, 1, str(tmp_path))
        assert row["imports"] == [], (args, row)
    done = run_tsf("--version")
    import tsf

    assert done.returncode == 0 and done.stdout.strip() == f"tsf {tsf.__version__}"


def test_config_errors_found_before_parsing_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1\n")
    for args, expected in ((["sample", "--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
                           (["sample", f"--config={bad}"], "is not valid YAML (line 2)"),
                           (["smaple", "--config", "x.yaml"], "unknown command 'smaple'")):
        done = run_tsf(*args, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tsf: error: ") and expected in lines[0], lines


def test_tsf_help_is_tsf_dash_dash_help_and_help_of_a_command_is_its_help(capsys):
    main(["--help"])
    overview = capsys.readouterr().out
    main(["help"])
    assert capsys.readouterr().out == overview
    assert {line.split()[0] for line in overview.splitlines() if line.startswith("  ")} == set(COMMANDS) >= set(TOOLS)
    with pytest.raises(SystemExit) as done:
        main(["help", "table"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: tsf table")


def test_piped_help_exits_without_a_broken_pipe_traceback():
    """`tsf --help | head`: the reader is gone before tsf writes."""
    proc = subprocess.Popen([sys.executable, "-m", "tsf", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has even started: every write of tsf meets a closed pipe
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "BrokenPipeError" not in err and "Exception ignored" not in err, err


def test_a_tools_yes_no_flag_takes_all_three_spellings_and_never_swallows_a_positional():
    p = ToolParser(prog="t")
    p.add_argument("configs", nargs="*")
    p.add_argument("--overwrite", action="store_true")
    top = ToolParser(prog="bench")
    q = top.add_subparsers(dest="what").add_parser("x")  # a subcommand's parser is a ToolParser too
    q.add_argument("--diffusers", action="store_true")
    assert p.parse_args([]).overwrite is False
    assert p.parse_args(["--overwrite"]).overwrite is True
    assert p.parse_args(["--overwrite", "true"]).overwrite is True
    assert p.parse_args(["--overwrite", "false"]).overwrite is False
    assert p.parse_args(["--overwrite=False"]).overwrite is False
    got = p.parse_args(["--overwrite", "a.yaml", "b.yaml"])
    assert got.overwrite is True and got.configs == ["a.yaml", "b.yaml"]
    assert top.parse_args(["x", "--diffusers"]).diffusers is True
    assert top.parse_args(["x", "--diffusers", "false"]).diffusers is False
    with pytest.raises(SystemExit):
        p.parse_args(["--overwrite=maybe"])
    assert bare_flags(["--a", "--", "--a"], {"--a"}) == ["--a=true", "--", "--a"]  # after --: not ours


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_tool_parses_with_the_one_flag_style(tool, capsys):
    """No tool keeps a flag that takes no value: each yes/no option of its help reads ``[true|false]``."""
    with pytest.raises(SystemExit):
        main([tool, "--help"])
    text = capsys.readouterr().out
    assert text.startswith(f"usage: tsf {tool}")
    source = (ROOT / "tsf" / "commands" / f"{tool}.py").read_text()
    assert "argparse.ArgumentParser(" not in source


def test_sweep_takes_its_flags_bare_and_with_a_value(tmp_path):
    """`tsf sweep FILE --dry_run` and `--dry_run true --overwrite` (failed before with 'unrecognized arguments')."""
    import yaml

    spec = {"method": "grid", "command": ["tsf", "sample", "${args}"],
            "parameters": {"config": {"value": "configs/gmm/best_of_n.yaml"}, "seed_everything": {"values": [1, 2]}}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    for flags in (["--dry_run"], ["--dry_run", "true", "--overwrite"], ["--overwrite", "true", "--dry_run=true"]):
        done = run_tsf("sweep", str(path), *flags, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("tsf sample") == 2, done.stdout


def test_sample_takes_its_flags_bare_and_with_a_value(capsys):
    """`tsf sample --overwrite` (failed before with 'expected one argument'), `--overwrite true`, and the Trainer's
    yes/no options bare."""
    from tsf.cli import main as cli_main

    config = str(ROOT / "configs/gmm/best_of_n.yaml")
    for flags, overwrite in ((["--overwrite"], "true"), (["--overwrite", "true"], "true"),
                             (["--overwrite", "false"], "false"), (["--overwrite=true"], "true")):
        with pytest.raises(SystemExit) as done:
            cli_main(["sample", "--config", config, *flags, "--trainer.enable_progress_bar", "--print_config"])
        assert done.value.code in (0, None)
        out = capsys.readouterr().out
        assert f"\noverwrite: {overwrite}\n" in out and "enable_progress_bar: true" in out


@pytest.mark.parametrize("max_epochs", [None, 1])
def test_a_run_bounded_by_steps_is_labelled_by_steps_through_a_public_hook(max_epochs):
    """The fine-tuning bar reads "Training steps", not "Epoch 0/-2"; a run bounded by epochs keeps Lightning's label.
    The label is set in ``on_train_epoch_start`` (a public callback hook), not in a private method."""
    import torch
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.callbacks import RichProgressBar

    from tsf.cli import steps_progress_bar

    bar = steps_progress_bar()
    assert "_get_train_description" not in type(bar).__dict__
    seen = []

    class Look(Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(str(bar.progress.tasks[bar.train_progress_bar_id].description))

    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, i):
            return (self.w - batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)), batch_size=2)

    Trainer(max_steps=2, max_epochs=max_epochs, callbacks=[bar, Look()], logger=False, enable_checkpointing=False,
            enable_model_summary=False).fit(Tiny())
    assert isinstance(bar, RichProgressBar) and seen
    assert seen[0].strip() == ("Training steps" if max_epochs is None else "Epoch 0/0")


def test_a_chosen_classes_yes_no_option_is_taken_bare_and_a_bare_option_of_another_type_still_fails(capsys):
    """``--model.init_args.base.init_args.batch_invariant`` (an option of the config's model class, known to the
    parser only once it has read the config) bare is ``true``; a bare ``num_steps`` keeps its error."""
    from tsf.cli import main as cli_main

    config = str(ROOT / "configs/digits/best_of_n.yaml")
    key = "--model.init_args.base.init_args.batch_invariant"
    for flags, expected in (([key], "true"), ([key, "false"], "false"), ([key, "true"], "true")):
        with pytest.raises(SystemExit) as done:
            cli_main(["sample", "--config", config, *flags, "--print_config"])
        assert done.value.code in (0, None)
        assert f"batch_invariant: {expected}\n" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cli_main(["sample", "--config", config, "--model.init_args.base.init_args.num_steps", "--print_config"])
    assert done.value.code == 2 and "expected one argument" in capsys.readouterr().err
