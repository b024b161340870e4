"""Results written in shards as batches finish, so that a stopped run resumes where it was.

A shard holds one batch's final samples (``x0``, float ``images``), their sample ids, the
sampler's per-sample diagnostics (SMC's ESS and resampling flags) and the batch's counted compute; it is written atomically (temporary file, then rename) with a
SHA-256 of its tensors in the metadata. On resume a shard whose ids match the batch and
whose checksum verifies is used instead of sampling again; a missing, partial or corrupt
shard is redone, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from tsf.samplers.base import SampleBatch


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


class ShardStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sample_ids: torch.Tensor) -> Path:
        ids = sample_ids.tolist()
        return self.root / f"{ids[0]:09d}-{ids[-1]:09d}-{len(ids)}.safetensors"

    def save(self, batch: SampleBatch) -> None:
        tensors = {"x0": batch.x0.float().cpu().contiguous(), "sample_id": batch.sample_ids.cpu().contiguous()}
        if batch.images is not None:
            tensors["images"] = batch.images.float().cpu().contiguous()
        for key, value in (batch.diagnostics or {}).items():  # per-sample diagnostics (SMC's ESS, ...)
            if torch.is_tensor(value) and value.dim() and len(value) == len(batch.sample_ids):
                tensors[f"diagnostics/{key}"] = value.cpu().contiguous()
        meta = {"sha256": _digest(tensors), "compute": json.dumps(batch.compute)}
        path = self.path(batch.sample_ids)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    def load(self, sample_ids: torch.Tensor, device) -> Optional[SampleBatch]:
        """The batch's shard if it exists and verifies, else ``None`` (and a corrupt file is removed)."""
        path = self.path(sample_ids)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
            ok = (meta.get("sha256") == _digest(tensors) and torch.equal(tensors["sample_id"], sample_ids.cpu()))
        except Exception:  # truncated or not a safetensors file
            ok = False
        if not ok:
            path.unlink(missing_ok=True)
            return None
        diagnostics = {k.split("/", 1)[1]: v.to(device) for k, v in tensors.items() if k.startswith("diagnostics/")}
        return SampleBatch(x0=tensors["x0"].to(device), sample_ids=tensors["sample_id"],
                           images=tensors["images"].to(device) if "images" in tensors else None,
                           compute=json.loads(meta["compute"]), diagnostics=diagnostics or None)
