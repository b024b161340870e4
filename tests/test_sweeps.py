"""Every sweep in sweeps/ expands (wandb's own sweep engine, offline) into command lines that parse
and validate (`--print_config`) without running."""

import pytest
import yaml

from tsf.cli import main

sweeps = pytest.importorskip("sweeps")  # the wandb[sweeps] extra (in the test extra)
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def expand(spec: dict, draws: int = 4) -> list[dict]:
    """Every grid point, or ``draws`` configurations of a random/bayes sweep."""
    runs: list = []
    while len(runs) < (10_000 if spec["method"] == "grid" else draws):
        nxt = sweeps.next_run(spec, runs, validate=True)
        if nxt is None:
            break
        nxt.state = sweeps.RunState.finished
        nxt.summary_metrics = {spec["metric"]["name"]: float(len(runs))}
        runs.append(nxt)
    return [{k: v["value"] for k, v in r.config.items()} for r in runs]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_generated_command_validates(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = yaml.safe_load(path.read_text())
    assert spec["command"][0] == "tsf" and spec["command"][-1] == "${args}"
    configs = expand(spec)
    assert configs
    if spec["method"] == "grid":
        sizes = [len(p["values"]) if "values" in p else 1 for p in spec["parameters"].values()]
        assert len(configs) == __import__("math").prod(sizes)
    for cfg in configs:
        args = [f"--{k}={v}" for k, v in cfg.items()]  # what ${args} expands to
        with pytest.raises(SystemExit) as e:
            main([*spec["command"][1:-1], *args, "--print_config"])
        assert e.value.code in (0, None), args
        capsys.readouterr()
