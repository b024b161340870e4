"""`tsf bench flops`: FLOPs per row counted on the meta device (nothing computed or downloaded), and what the
Tweedie-gradient proposal saves per particle-step against the gradient through the network."""

import pytest

from tiny import tiny_pipeline
from tsf.commands.bench import run
from tsf.commands.bench_flops import count_flops, forward_and_backward


def test_the_counter_counts_a_matrix_product_and_its_backward_to_the_input():
    import torch

    with torch.device("meta"):
        lin = torch.nn.Linear(64, 32, bias=False).requires_grad_(False)
        x = torch.empty(8, 64)
    assert count_flops(lambda: lin(x)) == 2 * 8 * 64 * 32
    fwd, both = forward_and_backward(lin, x)
    assert (fwd, both) == (2 * 8 * 64 * 32, 2 * 2 * 8 * 64 * 32)  # the backward to the input: one more product


def test_a_folder_s_unet_and_vae_from_their_configs(tmp_path, capsys):
    folder = tiny_pipeline("sd15", tmp_path / "sd15")
    out = run(["flops", "--families", "--pretrained", str(folder)])
    (row,) = out["rows"]
    assert row["reward_forward"] == 0 and row["unet_pair_forward"] > 0 and row["vae_forward"] > 0
    # the backward to the input costs at most about one more forward (the weights are frozen: no weight gradients),
    # less where a branch does not lead back to the input (the UNet's time and text embeddings)
    for part in ("unet_pair", "vae"):
        assert 1.2 < row[f"{part}_forward_backward"] / row[f"{part}_forward"] < 2.2, part
    assert row["tweedie_step_plain"] == row["unet_pair_forward"] + row["vae_forward_backward"]
    assert row["network_step_plain"] == row["unet_pair_forward_backward"] + row["vae_forward_backward"]
    assert 0 < row["ratio_plain"] < 1 and row["ratio_checkpointing"] < 1
    assert "tweedie / network" in capsys.readouterr().out


@pytest.mark.slow
def test_sd15_at_its_real_size():
    (row,) = run(["flops", "--families", "sd15"])["rows"]
    # SD 1.5's UNet: about 0.35-0.4 TMACs per row at 64 x 64 latents (published counts), 0.7-0.8 TFLOPs, so 1.4-1.6 for
    # the guided pair; its VAE decoder at 512 px about 2.5 TFLOPs; CLIP ViT-L/14 at 224 px about 0.16
    assert 1.2e12 < row["unet_pair_forward"] < 2.0e12
    assert 1.5e12 < row["vae_forward"] < 4e12
    assert 0.1e12 < row["reward_forward"] < 0.25e12
    assert 0.3 < row["ratio_plain"] < 0.9
