"""wandb for a tsf run: `auto` mode asks wandb's own credential lookup (a self-hosted server's host in
.netrc, WANDB_BASE_URL, WANDB_API_KEY, the settings file), a tsf sweep's runs share a group and a tag."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEY = "0123456789abcdef0123456789abcdef01234567"  # the form of a wandb API key (40 hex digits)
SERVER = "https://wandb.example.org"  # a self-hosted server (nothing is sent to it)


def auto_mode(home: Path, netrc_host=None, settings=None, **env) -> str:
    """``resolve_mode("auto")`` in a fresh process whose home is ``home`` (no WANDB_* of this machine)."""
    home.mkdir(parents=True, exist_ok=True)
    if netrc_host:
        (home / ".netrc").write_text(f"machine {netrc_host}\n  login user\n  password {KEY}\n")
        (home / ".netrc").chmod(0o600)
    if settings:
        (home / ".config" / "wandb").mkdir(parents=True, exist_ok=True)
        (home / ".config" / "wandb" / "settings").write_text("[default]\n" + settings)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("NETRC", "XDG_CONFIG_HOME")}
    clean.update(HOME=str(home), PYTHONPATH=str(ROOT), **env)
    done = subprocess.run([sys.executable, "-c", "from tsf.tracking import resolve_mode; print(resolve_mode('auto'))"],
                          capture_output=True, text=True, env=clean, cwd=home, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_auto_mode_finds_the_credentials_of_a_self_hosted_server(tmp_path):
    # the case of the issue: WANDB_BASE_URL and a .netrc entry for that host (was: silently offline)
    assert auto_mode(tmp_path / "a", netrc_host="wandb.example.org", WANDB_BASE_URL=SERVER) == "online"
    # the server named in wandb's settings file instead of the environment
    assert auto_mode(tmp_path / "b", netrc_host="wandb.example.org", settings=f"base_url = {SERVER}\n") == "online"
    # a key for api.wandb.ai is no key for another server
    assert auto_mode(tmp_path / "c", netrc_host="api.wandb.ai", WANDB_BASE_URL=SERVER) == "offline"
    assert auto_mode(tmp_path / "d", netrc_host="api.wandb.ai") == "online"
    assert auto_mode(tmp_path / "e", WANDB_API_KEY=KEY, WANDB_BASE_URL=SERVER) == "online"
    assert auto_mode(tmp_path / "f") == "offline"  # nothing configured: offline, no prompt
    assert auto_mode(tmp_path / "g", netrc_host="wandb.example.org", WANDB_BASE_URL=SERVER, WANDB_MODE="offline") == "offline"


def test_a_sweeps_runs_get_its_name_as_their_group_and_a_sweep_tag(monkeypatch):
    from tsf.cli import wandb_logger
    from tsf.tracking import sweep_environment

    config = {"config": [str(ROOT / "configs/digits/das.yaml")],
              "model": {"init_args": {"sampler": {"class_path": "tsf.samplers.DAS"}, "reward": "digit"}}}
    for key in ("WANDB_RUN_GROUP", "WANDB_TAGS"):
        monkeypatch.delenv(key, raising=False)
    alone = wandb_logger("/tmp/unused", "n", None, "disabled", config, "das")._wandb_init
    assert alone["group"] == "digits/das" and "sweep" not in alone["tags"]
    for key, value in sweep_environment("alpha_digits").items():  # what `tsf sweep` gives each run's process
        monkeypatch.setenv(key, value)
    swept = wandb_logger("/tmp/unused", "n", None, "disabled", config, "das")._wandb_init
    assert swept["group"] == "alpha_digits" and swept["tags"] == [*alone["tags"], "sweep"]


@pytest.mark.parametrize("resume", [False, True])
def test_the_run_id_file_is_what_a_resumed_run_continues(tmp_path, resume):
    from tsf.tracking import new_run_id, read_run_id, write_run_id

    assert read_run_id(tmp_path) is None
    first = new_run_id()
    write_run_id(tmp_path, first)
    assert read_run_id(tmp_path) == first and new_run_id() != first
