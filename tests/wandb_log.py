"""Read an offline wandb run back from its ``.wandb`` transaction log (tests only).

The log is LevelDB's log format (7-byte file header ``:W&B`` + magic + version, then
32 KiB blocks of records with a 7-byte header: crc32, length, type) whose payloads are
``wandb_internal_pb2.Record`` protobufs. Offline runs write no ``wandb-summary.json``.
"""

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            buf = payload
        elif kind == FIRST:
            buf = payload
            continue
        elif kind == MIDDLE:
            buf += payload
            continue
        elif kind == LAST:
            buf += payload
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(buf)
        yield rec


def settled(log, timeout=120.0):
    """Wait until wandb's service has written the run's exit record and stopped writing: ``finish()``
    returns before the (separate) service process has flushed the log, and on a loaded machine the
    summary can land seconds later."""
    import time

    deadline, last = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        size = log.stat().st_size
        try:
            done = size == last and any(r.WhichOneof("record_type") == "exit" for r in records(log))
        except Exception:  # a record half written: not settled yet
            done = False
        if done:
            return
        last = size
        time.sleep(0.5)
    raise AssertionError(f"{log} was still being written after {timeout} s")


def read_run(run_dir):
    """``(history rows, summary dict, files)`` of the single offline run under ``run_dir/wandb``."""
    logs = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    settled(logs[0])
    history, summary, files = [], {}, []
    for rec in records(logs[0]):
        which = rec.WhichOneof("record_type")
        if which == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif which == "summary":
            for i in rec.summary.update:
                summary[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif which == "files":
            files += [f.path for f in rec.files.files]
    return history, summary, files


def read_config(run_dir):
    """The config of the single offline run under ``run_dir/wandb``, as wandb stores it (one key per entry)."""
    logs = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    settled(logs[0])
    config, run = {}, {}
    for rec in records(logs[0]):
        which = rec.WhichOneof("record_type")
        if which == "config":
            for i in rec.config.update:
                config[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif which == "run":
            run = {"group": rec.run.run_group, "tags": list(rec.run.tags), "project": rec.run.project,
                   "id": rec.run.run_id}
            for i in rec.run.config.update:
                config[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return {k: v.get("value", v) if isinstance(v, dict) and set(v) <= {"value", "desc"} else v
            for k, v in config.items() if k != "_wandb"}, run
