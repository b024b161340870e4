"""Sampling with 2 CPU processes (Lightning DDP, gloo) gives the 1-process samples and metrics.

Run as subprocesses: an in-process DDP launch under pytest would re-run pytest on rank 1.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

from tsf.cli import load_samples

ROOT = Path(__file__).resolve().parents[1]


def sample(tmp_path, name, *extra):
    cmd = [sys.executable, "-m", "tsf.cli", "sample", "--config", str(ROOT / "configs/digits/das.yaml"),
           "--data.init_args.num_samples=23", "--data.init_args.batch_size=5",  # uneven shards: 12 and 11 ids
           "--model.init_args.fidelity_samples=64", "--model.init_args.base.init_args.num_steps=10",
           "--wandb_mode=disabled", "--trainer.enable_progress_bar=false", f"--output_dir={tmp_path}",
           f"--run_name={name}", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    if "--trainer.devices=2" in extra:  # each rank reports its own progress
        assert "[rank 0/2] 3/3 batches" in res.stderr and "[rank 1/2] 3/3 batches" in res.stderr, res.stderr[-2000:]
    return tmp_path / name


def test_two_processes_give_the_one_process_samples_and_metrics(tmp_path):
    one = sample(tmp_path, "one")
    two = sample(tmp_path, "two", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")
    a, b = load_samples(one), load_samples(two)
    assert b["sample_id"].tolist() == list(range(23))  # every id exactly once, no padding duplicates
    assert torch.equal(a["x0"], b["x0"]) and torch.equal(a["images"], b["images"])
    for k in a["rewards"]:
        assert torch.equal(a["rewards"][k], b["rewards"][k])
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert ma.keys() == mb.keys()
    # wall time, and the rows really computed: the padding of a batch-invariant model's short chunks
    # depends on how the samples were batched (the method's counts, nfe and reward_calls, do not)
    batching = {"compute/seconds", "compute/model_rows", "compute/decode_rows", "compute/reward_rows"}
    for k in ma:
        if k not in batching:
            assert abs(ma[k] - mb[k]) <= 1e-6 * max(1.0, abs(ma[k])), (k, ma[k], mb[k])


def test_the_shard_sampler_is_lightnings_unrepeated_distributed_sampler_where_that_one_runs():
    """``ShardSampler`` gives rank ``r`` of ``w`` the ids ``r::w``, as Lightning's ``UnrepeatedDistributedSampler``
    (what ``trainer.predict`` shards with) does, for every size that sampler accepts (it asserts every rank a
    sample; ``ShardSampler`` leaves such a rank empty)."""
    import pytest
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    from tsf.lightning.data import ConditionSampleIds, ShardSampler

    for world in (1, 2, 3, 4, 8):
        for n in range(world, 40):
            data = ConditionSampleIds([None], n)
            for rank in range(world):
                theirs = UnrepeatedDistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
                ours = ShardSampler(n, rank, world)
                assert list(ours) == list(theirs) and len(ours) == len(theirs), (n, world, rank)
    assert [list(ShardSampler(3, r, 4)) for r in range(4)] == [[0], [1], [2], []]
    with pytest.raises(AssertionError):
        UnrepeatedDistributedSampler(ConditionSampleIds([None], 3), num_replicas=4, rank=3, shuffle=False)
