"""`tsf bench overhead` and `tsf bench throughput` at a tiny size: the JSON they write, and that the
bare replay makes exactly the calls the sampler's compute counters counted. Timing targets are met
in the benchmarks (README), never asserted here."""

import json
import math

from tsf.commands.bench import CONFIGS, run

COUNTED = ("nfe", "nfe_grad", "reward_calls", "reward_grad_calls")


def test_overhead_replays_the_counted_calls_of_every_sampler(tmp_path, capsys):
    path = tmp_path / "overhead.json"
    run(["overhead", "--samples", "3", "--k", "2", "--steps", "3", "--repeats", "1", "--min_seconds", "0",
         "--device", "cpu", "--stub", "--json", str(path)])
    out = json.loads(path.read_text())
    assert out["benchmark"] == "overhead" and out["settings"]["K"] == 2
    assert {"cpu", "cpu_cores", "torch_threads", "device"} <= set(out["machine"])
    import torch

    env = out["machine"]["environment"]  # torch.utils.collect_env's description, beside what it lacks
    assert env["torch_version"] == torch.__version__ and "python_version" in env
    assert [r["key"] for r in out["rows"]] == list(CONFIGS)
    for r in out["rows"]:
        name = r["sampler"]
        assert r["samples"] == 3 and r["num_steps"] == 3
        assert r["K"] == (1 if r["key"] == "dps" else 2), name
        # the replay made the same calls, on as many rows, as the hooks of the sampler's ComputeCounter counted
        for key in COUNTED:
            assert r["replay_compute"][key] == r["compute"][key], (name, key)
        assert r["compute"]["nfe"] > 0 and r["compute"]["reward_calls"] > 0, name
        assert r["recorded_calls"]["model"] > 0 and r["recorded_calls"]["reward"] > 0, name
        assert len(r["sampler_times"]) == len(r["replay_times"]) == 1
        for key in ("sampler_seconds", "replay_seconds", "ratio", "ratio_of_medians", "stub_seconds"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key)
        assert r["ratio"] == r["paired_ratios"][0] == r["sampler_times"][0] / r["replay_times"][0], name
        assert r["direct_ratio"] == 1 + r["stub_seconds"] / r["replay_seconds"], name
    rows = {r["key"]: r for r in out["rows"]}
    # gradient samplers replay forward + backward for every counted gradient row; the others none
    # (DAS takes no gradient before the last DDIM step, which has no noise)
    assert 0 < rows["das"]["compute"]["nfe_grad"] < rows["das"]["compute"]["nfe"]
    assert rows["dps"]["replay_compute"]["reward_grad_calls"] > 0
    assert rows["smc"]["compute"]["nfe_grad"] == 0
    # SVDD-MC's learned value network is replayed too (it is not base-model NFE)
    assert rows["svdd_mc"]["replay_compute"]["value_calls"] > 0 and rows["svdd_mc"]["recorded_calls"]["value"] > 0
    table = capsys.readouterr().out
    assert "| sampler |" in table and "machine:" in table and "| DAS |" in table


def test_throughput_against_k_and_batch_size(tmp_path, capsys):
    path = tmp_path / "throughput.json"
    run(["throughput", "--samplers", "best_of_n", "smc", "--ks", "1", "2", "--batch_sizes", "2", "5",
         "--k", "2", "--batch", "3", "--steps", "2", "--min_seconds", "0", "--device", "cpu", "--json", str(path)])
    out = json.loads(path.read_text())
    assert out["benchmark"] == "throughput" and "cpu" in out["machine"]
    assert [(r["key"], r["K"], r["batch_size"]) for r in out["vs_k"]] == [
        ("best_of_n", 1, 3), ("best_of_n", 2, 3), ("smc", 1, 3), ("smc", 2, 3)]
    assert [(r["key"], r["K"], r["batch_size"]) for r in out["vs_batch_size"]] == [
        ("best_of_n", 2, 2), ("best_of_n", 2, 5), ("smc", 2, 2), ("smc", 2, 5)]
    for r in out["vs_k"] + out["vs_batch_size"]:
        assert math.isfinite(r["samples_per_second"]) and r["samples_per_second"] > 0
        assert r["nfe_per_sample"] == r["K"] * 2  # K trajectories of T = 2 steps
        assert r["calls"] >= 1  # torch.utils.benchmark's blocked_autorange: its blocks of calls
    assert "| Best-of-N |" in capsys.readouterr().out
