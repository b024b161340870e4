import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # reference sets of plain base samples are cached per test session, not in ~/.cache
    monkeypatch.setenv("TSF_CACHE", str(tmp_path_factory.getbasetemp() / "tsf-cache"))
