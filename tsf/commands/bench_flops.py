"""``tsf bench flops``: the work of one DAS step per particle on the real architectures, counted in FLOPs.

The UNet, the VAE decoder and the reward's CLIP tower of SD 1.5 (512 px) and SDXL (1024 px) are built from their
configs on PyTorch's ``meta`` device (nothing is computed, allocated or downloaded) and run under
``torch.utils.flop_counter.FlopCounterMode``: a forward, and a forward with the backward to its input (the
weights are frozen, as in sampling). A diffusers folder (``--pretrained DIR``) is measured the same way (its UNet
and VAE; its reward is not known here and counts 0). From these per-row counts, what a gradient proposal costs
per particle and step:

* through the network (``gradient_through: network``): the UNet on the guided pair of rows with a graph and its
  backward, the VAE decode and the reward with theirs;
* through the Tweedie estimate (``tweedie``): the UNet's forward alone, the same VAE and reward work;

with gradient checkpointing (``gradient_checkpointing: true`` in the SD configs: the backward recomputes the
forward of the UNet and of the VAE) and without. Their ratio is what ``tweedie`` saves where the time follows the
FLOPs (a GPU at real sizes); on a small pipeline on a CPU other costs weigh in (``tsf bench pipeline`` times it).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

#: the families measured by default: their pipeline builder in bench_gpu, image size, reward tower
FLOP_FAMILIES = ("sd15", "sdxl")


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` as ``FlopCounterMode`` counts them (matrix products, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def forward_and_backward(module_fn: Callable[[Any], Any], x) -> tuple[int, int]:
    """``(forward FLOPs, forward + backward-to-the-input FLOPs)`` of ``module_fn`` at input ``x`` (meta tensors)."""
    import torch

    with torch.no_grad():
        fwd = count_flops(lambda: module_fn(x))

    def both():  # (backward(), not autograd.grad: the counter's module tracking supports only the former)
        leaf = x.detach().requires_grad_(True)
        module_fn(leaf).float().sum().backward()

    return fwd, count_flops(both)


def unet_call(unet, size: int, family: str) -> tuple[Callable, Any]:
    """The UNet on a guided pair of rows (the conditional and the unconditional one) at ``size`` px."""
    import torch

    rows, lat = 2, size // 8
    x = torch.empty(rows, unet.config.in_channels, lat, lat, device="meta")
    t = torch.full((rows,), 500, device="meta")
    ehs = torch.empty(rows, 77, unet.config.cross_attention_dim, device="meta")
    extra = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL's added conditioning
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.empty(rows, pooled, device="meta"),
                                       "time_ids": torch.empty(rows, 6, device="meta")}}
    return (lambda v: unet(v, t, encoder_hidden_states=ehs, **extra).sample), x


def vae_call(vae, size: int) -> tuple[Callable, Any]:
    import torch

    z = torch.empty(1, vae.config.latent_channels, size // 8, size // 8, device="meta")
    return (lambda v: vae.decode(v).sample), z


def clip_reward_call(proj: int = 768) -> tuple[Callable, Any]:
    """The aesthetic reward's work on one 224 px image: CLIP ViT-L/14's vision tower, its projection and the head."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from tsf.commands.bench_gpu import CLIP_L, REAL, clip_vision_config
    from tsf.rewards.clip import AestheticHead

    tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_vision_config(REAL, *CLIP_L["vision"]),
                                                           projection_dim=proj)).requires_grad_(False)
    head = AestheticHead(proj).requires_grad_(False)
    image = torch.empty(1, 3, 224, 224, device="meta")

    def call(v):
        e = tower(pixel_values=v).image_embeds
        return head(e / e.norm(dim=-1, keepdim=True))

    return call, image


def measure(name: str, unet, vae, size: int, reward: Optional[tuple[Callable, Any]]) -> dict:
    """Per-row FLOPs of the UNet (a guided pair), the VAE decode and the reward, forward and forward + backward,
    and the per particle-step costs of the two gradient proposals."""
    for m in (unet, vae):
        m.requires_grad_(False)
    u_f, u_fb = forward_and_backward(*unet_call(unet, size, name))
    v_f, v_fb = forward_and_backward(*vae_call(vae, size))
    r_f, r_fb = forward_and_backward(*reward) if reward is not None else (0, 0)
    out = {"family": name, "size": size, "unet_pair_forward": u_f, "unet_pair_forward_backward": u_fb,
           "vae_forward": v_f, "vae_forward_backward": v_fb, "reward_forward": r_f, "reward_forward_backward": r_fb}
    for ckpt in (False, True):
        # checkpointing recomputes the forward of the UNet (network only) and of the VAE (both) in the backward
        network = u_fb + v_fb + r_fb + (u_f + v_f if ckpt else 0)
        tweedie = u_f + v_fb + r_fb + (v_f if ckpt else 0)
        key = "checkpointing" if ckpt else "plain"
        out[f"network_step_{key}"], out[f"tweedie_step_{key}"] = network, tweedie
        out[f"ratio_{key}"] = tweedie / network
    return out


def family_models(key: str, root: Path):
    """A family's UNet and VAE at full size on the meta device, and its image size."""
    from accelerate import init_empty_weights

    from tsf.commands.bench_gpu import REAL, sd15_pipeline, sdxl_pipeline

    build, size = {"sd15": (sd15_pipeline, 512), "sdxl": (sdxl_pipeline, 1024)}[key]
    with init_empty_weights():  # the weights on the meta device (the schedulers' tables stay real)
        pipe = build(REAL, root)
    return pipe.unet, pipe.vae, size


def folder_models(path: str):
    """The UNet and VAE of a diffusers folder, from their configs on the meta device (no weights read)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(Path(path) / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(Path(path) / "vae")))
    size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return unet, vae, size


def _g(n: float) -> str:
    return f"{n / 1e9:,.1f}"


def flops(args) -> dict:
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.families:
            unet, vae, size = family_models(key, Path(tmp))
            with torch.device("meta"):
                reward = clip_reward_call()
            rows.append(measure(key, unet, vae, size, reward))
        for path in args.pretrained or []:
            unet, vae, size = folder_models(path)
            rows.append(measure(path, unet, vae, size, None))
    print("\nDAS per particle and step, in GFLOPs (FlopCounterMode on the meta device; the UNet on the guided pair "
          "of rows, the VAE decode and the reward on one; forward / forward + backward to the input)\n")
    print("| model | px | UNet pair | VAE decode | reward | network-gradient step | Tweedie-gradient step | "
          "tweedie / network | the same with checkpointing |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['size']} | {_g(r['unet_pair_forward'])} / {_g(r['unet_pair_forward_backward'])} | "
              f"{_g(r['vae_forward'])} / {_g(r['vae_forward_backward'])} | "
              f"{_g(r['reward_forward'])} / {_g(r['reward_forward_backward'])} | {_g(r['network_step_plain'])} | "
              f"{_g(r['tweedie_step_plain'])} | {r['ratio_plain']:.3f} | {r['ratio_checkpointing']:.3f} |")
    return {"benchmark": "flops", "rows": rows}


def add_arguments(q) -> None:
    q.add_argument("--families", nargs="*", default=list(FLOP_FAMILIES), choices=list(FLOP_FAMILIES))
    q.add_argument("--pretrained", nargs="*", default=None,
                   help="diffusers folders measured too (their UNet and VAE, from the configs; reward counted 0)")
