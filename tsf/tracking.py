"""wandb for a ``tsf`` run: whether it logs online, the id that a resumed run continues, the group of a sweep's
runs (docs/run_directory.md, "wandb")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

#: the file of the run directory that holds the id of the run's wandb run
RUN_ID_FILE = "wandb_run_id"


def has_credentials() -> bool:
    """Whether wandb's own lookup finds credentials for the server it would log to: ``WANDB_BASE_URL`` (or the
    ``base_url`` setting, else api.wandb.ai), with ``WANDB_API_KEY``, an identity token file, the ``.netrc``
    entry of that host (``NETRC`` names another file) or the ``api_key`` setting. Nothing is prompted, and
    nothing is sent to the server."""
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False))
    except TypeError:  # wandb without login(prompt=...): its (deprecated) lookup of the same sources
        return bool(getattr(wandb.api, "api_key", None))
    except Exception:  # an invalid key or settings file: no credentials to log in with
        return False


def resolve_mode(mode: str) -> str:
    """``online``/``offline``/``disabled`` as given; ``auto``: ``WANDB_MODE`` when set, else online when
    wandb finds credentials (:func:`has_credentials`), else offline."""
    if mode != "auto":
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if has_credentials() else "offline")


def read_run_id(run_dir: Path) -> Optional[str]:
    """The id of the wandb run that an earlier attempt of this run started, ``None`` if none did."""
    path = Path(run_dir) / RUN_ID_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


def new_run_id() -> str:
    """The id of a new run: a wandb agent's (``WANDB_RUN_ID``) when a sweep agent started this process, else a
    fresh one of wandb's form (8 random lower-case letters and digits; wandb's own generator is not public)."""
    if os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def write_run_id(run_dir: Path, run_id: str) -> None:
    (Path(run_dir) / RUN_ID_FILE).write_text(run_id + "\n")


def sweep_environment(name: str) -> dict[str, str]:
    """What a run of ``tsf sweep`` gets in its environment: the sweep's name as its wandb group and a ``sweep``
    tag (wandb's own ``WANDB_RUN_GROUP`` and ``WANDB_TAGS``), so that its runs appear together after
    ``wandb sync``."""
    tags = [t for t in os.environ.get("WANDB_TAGS", "").split(",") if t]
    return {"WANDB_RUN_GROUP": name, "WANDB_TAGS": ",".join(dict.fromkeys([*tags, "sweep"]))}


def group_and_tags(group: str, tags: list[str]) -> tuple[str, list[str]]:
    """A run's group and tags: ``WANDB_RUN_GROUP`` replaces the group (a sweep's runs), ``WANDB_TAGS``
    (comma-separated) adds tags."""
    extra = [t.strip() for t in os.environ.get("WANDB_TAGS", "").split(",") if t.strip()]
    return os.environ.get("WANDB_RUN_GROUP") or group, list(dict.fromkeys([*tags, *extra]))
