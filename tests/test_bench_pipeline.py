"""`tsf bench pipeline` on a tiny random SD 1.x pipeline: tsf's sampler and diffusers' own pipeline
side by side, the work counted by the bench's own hooks, and the JSON it writes. Timings are never
asserted."""

import json
import math

from tiny import tiny_pipeline
from tsf.commands.bench import pipeline_sampler, run
from tsf.rewards import Reward

STEPS = 2
PROMPTS = ["a photo of a cat", "a dog"]


class TinyReward(Reward):
    """A differentiable reward with an init arg, passed to the bench by class_path."""

    name = "tiny"
    differentiable = True

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, images, conditions=None):
        return self.scale * images.flatten(1).mean(1)


def test_pipeline_counts_the_work_of_tsf_and_diffusers(tmp_path, capsys):
    pretrained = tiny_pipeline("sd15", tmp_path / "sd15")
    path = tmp_path / "pipeline.json"
    out = run(["pipeline", "--pretrained", str(pretrained), "--reward", f"{__name__}.TinyReward",
               "--reward_args", '{"scale": 2.0}', "--sampler", "tsf.samplers.BaseSampler", "--prompts", *PROMPTS,
               "--steps", str(STEPS), "--runs", "1", "--warmup", "0", "--diffusers", "--device", "cpu",
               "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(out))
    assert saved["benchmark"] == "pipeline" and {"cpu", "torch_threads", "device"} <= set(saved["machine"])
    assert saved["settings"]["steps"] == STEPS and saved["settings"]["prompts"] == PROMPTS
    assert saved["reward_class"].endswith("TinyReward") and saved["sampler_repr"][0].startswith("BaseSampler")
    rows = {r["implementation"]: r for r in saved["rows"]}
    assert list(rows) == ["tsf", "diffusers"]
    for name, r in rows.items():
        for key in ("seconds_per_image", "seconds_per_image_min", "seconds_per_image_max", "counts_per_image",
                    "compute_per_image", "rss_after_load_mb", "peak_rss_mb", "peak_cuda_mb", "reward_mean"):
            assert key in r, (name, key)
        assert math.isfinite(r["seconds_per_image"]) and r["seconds_per_image"] > 0, name
        assert len(r["seconds_per_image_runs"]) == 1 and r["images"] == len(PROMPTS), name
        c = r["counts_per_image"]
        # one guided UNet evaluation per step and image, on two rows (the conditional and unconditional)
        assert c["unet_rows"] == 2 * STEPS, (name, c)
        assert c["unet_grad_rows"] == 0 and c["reward_rows"] == 0, (name, c)  # plain sampling: no reward, no graph
        assert 0 <= r["reward_mean"] <= 2.0, name  # TinyReward(scale=2) of images in [0, 1]
    assert rows["diffusers"]["counts_per_image"]["unet_calls"] == STEPS / len(PROMPTS)  # both prompts in one call
    assert rows["diffusers"]["counts_per_image"]["decode_rows"] == 1
    assert rows["diffusers"]["compute_per_image"] is None
    assert rows["tsf"]["compute_per_image"]["nfe"] == STEPS  # tsf's own counter: one (guided) NFE per step
    assert saved["ratio_tsf_to_diffusers"] == rows["tsf"]["seconds_per_image"] / rows["diffusers"]["seconds_per_image"]
    table = capsys.readouterr().out
    assert "| tsf |" in table and "| diffusers |" in table and "machine:" in table and "tsf / diffusers" in table


def test_pipeline_times_several_sampler_variants_on_the_same_seeds(tmp_path, capsys):
    """DAS with the gradient through the network and through the Tweedie estimate, side by side: the same
    UNet rows, graphs through the UNet only for the first, rewards paired on the same seeds."""
    pretrained = tiny_pipeline("sd15", tmp_path / "sd15")
    out = run(["pipeline", "--pretrained", str(pretrained), "--reward", f"{__name__}.TinyReward",
               "--sampler", "configs/sd15/das.yaml", "--sampler_args", '{"num_particles": 2}',
               "--sampler_args", '{"num_particles": 2, "gradient_through": "tweedie"}', "--prompts", PROMPTS[0],
               "--steps", str(STEPS), "--runs", "2", "--warmup", "0", "--device", "cpu"])
    network, tweedie = out["rows"]
    assert network["implementation"] == 'tsf {"num_particles":2}'
    assert tweedie["implementation"] == 'tsf {"num_particles":2,"gradient_through":"tweedie"}'
    for r in (network, tweedie):
        assert r["counts_per_image"]["unet_rows"] == 2 * 2 * STEPS  # K = 2 particles, guided: two rows each
    # the gradient goes through the UNet (two guided rows per particle evaluation) for the network variant, through
    # the VAE and the reward alone for the Tweedie one
    assert network["counts_per_image"]["unet_grad_rows"] == 2 * network["compute_per_image"]["nfe_grad"] > 0
    assert tweedie["counts_per_image"]["unet_grad_rows"] == 0 and tweedie["compute_per_image"]["nfe_grad"] == 0
    assert tweedie["ratio_to_first"] == tweedie["seconds_per_image"] / network["seconds_per_image"]
    assert math.isfinite(tweedie["paired_reward_diff"]) and tweedie["paired_reward_diff_se"] is not None
    assert "reward difference on the same seeds" in capsys.readouterr().out


def test_pipeline_sampler_from_a_config_or_a_class_path():
    smc = pipeline_sampler("configs/sd15/das.yaml", {"num_particles": 2})
    assert type(smc).__name__ == "SMC" and smc.num_particles == 2 and smc.max_batch == 8  # the config's, overridden
    assert type(pipeline_sampler("tsf.samplers.BestOfN", {"num_particles": 3})).__name__ == "BestOfN"
