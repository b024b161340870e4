"""Every sweep in sweeps/ expands (wandb's own sweep engine, offline) into command lines that parse
and validate (`--print_config`) without running; `tsf sweep` runs a sweep file here, offline."""

import json

import pytest
import yaml

from tsf.cli import main
from tsf.commands.sweep import command_args, expand

sweeps = pytest.importorskip("sweeps")  # the wandb[sweeps] extra (in the test extra)
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_generated_command_validates(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = yaml.safe_load(path.read_text())
    assert spec["command"][0] == "tsf" and spec["command"][-1] == "${args}"
    configs = expand(spec, None if spec["method"] == "grid" else 4, score=lambda params: 0.0)  # bayes: any metric
    assert configs
    if spec["method"] == "grid":
        sizes = [len(p["values"]) if "values" in p else 1 for p in spec["parameters"].values()]
        assert len(configs) == __import__("math").prod(sizes)
    for cfg in configs:
        _, args = command_args(spec, cfg)  # what ${args} expands to
        with pytest.raises(SystemExit) as e:
            main([*spec["command"][1:-1], *args, "--print_config"])
        assert e.value.code in (0, None), args
        capsys.readouterr()


@pytest.mark.slow  # about a minute: runs several tsf sample processes
def test_a_grid_sweep_runs_offline_one_run_directory_per_configuration_and_resumes(tmp_path):
    from tsf.commands.sweep import main as sweep

    spec = {"program": "tsf", "method": "grid", "metric": {"name": "target/mean", "goal": "maximize"},
            "command": ["tsf", "sample", "--wandb_mode=offline", "--trainer.enable_progress_bar=false",
                        "--data.init_args.num_samples=6", "--model.init_args.fidelity_samples=0", "${args}"],
            "parameters": {"config": {"values": [str(ROOT / "configs/gmm/best_of_n.yaml"), str(ROOT / "configs/gmm/svdd_pm.yaml")]},
                           "model.init_args.sampler.init_args.num_particles": {"values": [2, 3]},
                           "model.init_args.base.init_args.num_steps": {"value": 10}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    sweep([str(path), "--output_dir", str(out)])
    runs = sorted(d for d in out.iterdir() if (d / "metrics.json").is_file())
    assert len(runs) == 4 and len({d.name for d in runs}) == 4, [d.name for d in runs]
    assert all(any((d / "wandb").glob("offline-run-*")) for d in runs)  # logged offline, no account
    from wandb_log import read_config

    for d in runs:  # the sweep's runs appear together after `wandb sync`: its name as their group, a sweep tag
        info = read_config(d)[1]
        assert info["group"] == "tiny" and "sweep" in info["tags"] and "gmm" in info["tags"], info
    record = json.loads((out / "sweep.json").read_text())
    assert sorted(r["params"]["model.init_args.sampler.init_args.num_particles"] for r in record["runs"]) == [2, 2, 3, 3]
    shards = {p: p.stat().st_mtime_ns for d in runs for p in (d / "shards").iterdir()}
    sweep([str(path), "--output_dir", str(out)])  # the same command: every finished run kept
    assert {p: p.stat().st_mtime_ns for d in runs for p in (d / "shards").iterdir()} == shards


def test_a_random_sweep_draws_the_stated_number_of_configurations_with_its_seed():
    spec = {"method": "random", "parameters": {"a": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
                                               "b": {"values": [1, 2, 3]}}}
    one, again, other = expand(spec, 5, seed=1), expand(spec, 5, seed=1), expand(spec, 5, seed=2)
    assert len(one) == 5 and one == again and one != other
    assert all(1e-4 <= c["a"] <= 1e-2 and c["b"] in (1, 2, 3) for c in one)
    with pytest.raises(Exception, match="needs them run"):
        expand({**spec, "method": "bayes"}, 2)


@pytest.mark.slow  # about a minute: three tsf sample processes
def test_ctrl_c_in_a_sweep_says_what_was_kept_and_how_to_continue(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group: the sweep and its run) during the second run: no
    traceback, the finished run is kept, the command that continues is said (by the run and the sweep), the
    exit code is 130; that command finishes the sweep without sampling the finished run again."""
    import os
    import shlex
    import signal
    import subprocess
    import sys

    spec = {"program": "tsf", "method": "grid",
            "command": ["tsf", "sample", "--wandb_mode=disabled", "--trainer.enable_progress_bar=false",
                        "--data.init_args.num_samples=6", "--model.init_args.fidelity_samples=0", "${args}"],
            "parameters": {"config": {"value": str(ROOT / "configs/gmm/best_of_n.yaml")},
                           "model.init_args.sampler.init_args.num_particles": {"values": [2, 3]}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "tsf", "sweep", str(path), "--output_dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=tmp_path)
    lines, started = [], 0
    for line in proc.stdout:
        lines.append(line)
        started += "GPU available" in line  # a run is past its start, inside tsf
        if started == 2:  # the second run: Ctrl-C, as a terminal sends it to the whole group
            os.killpg(proc.pid, signal.SIGINT)
            break
    text = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=300) == 130, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "tsf sweep: interrupted; 1 finished runs are kept in" in text, text[-2000:]
    command = text.split("Continue with:")[-1].strip().splitlines()[0]
    assert shlex.split(command)[:3] == ["tsf", "sweep", str(path)]
    (kept,) = [d for d in out.iterdir() if (d / "metrics.json").is_file()]
    shards = {p: p.stat().st_mtime_ns for p in (kept / "shards").iterdir()}
    done = subprocess.run([sys.executable, "-m", "tsf", *shlex.split(command)[1:]], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert len([d for d in out.iterdir() if (d / "metrics.json").is_file()]) == 2
    assert {p: p.stat().st_mtime_ns for p in (kept / "shards").iterdir()} == shards
