"""GPU memory and time of the SDXL (DAS, PickScore) and FLUX.1 [schnell] (RBF / ODE Best-of-N, aesthetic)
settings on the real architectures with random weights, built from config directly on the GPU in 16-bit
and handed to the model as its pipeline (no download, no multi-GB save). Memory and speed do not depend on
the weights' values.

    PYTHONPATH=tests python tests/bench_xl_flux_memory.py [--small]   # --small: a CPU smoke run
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from tiny import clip_tokenizer, t5_tokenizer
from tsf.models import Flux, StableDiffusion
from tsf.rewards.clip import AestheticHead, AestheticScore, PickScore
from tsf.samplers import RBF, SMC, BestOfN

SMALL = "--small" in sys.argv
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
W = 16 if SMALL else 1  # width divisor of the CPU smoke run
L = 4 if SMALL else 1   # depth divisor


def clip_dir(root: Path, vision: dict, text: dict, proj: int, head: bool) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = root / f"clip{proj}"
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)).half().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    clip_tokenizer(path, model_max_length=77)
    if head:
        torch.save(AestheticHead(proj).state_dict(), path / "head.pth")
    return path


def text_cfg(hidden, layers, heads, inter, proj=None, act="quick_gelu"):
    return dict(vocab_size=49408, hidden_size=hidden // W, num_hidden_layers=max(1, layers // L),
                num_attention_heads=max(1, heads // W), intermediate_size=inter // W, max_position_embeddings=77,
                hidden_act=act, **({"projection_dim": proj // W} if proj else {}))


def vis_cfg(hidden, layers, heads, inter):
    return dict(hidden_size=hidden // W, num_hidden_layers=max(1, layers // L), num_attention_heads=max(1, heads // W),
                intermediate_size=inter // W, image_size=224, patch_size=14)


def vae(latent: int, scaling: float, shift=None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         block_out_channels=[c // W for c in (128, 256, 512, 512)], layers_per_block=2,
                         latent_channels=latent, norm_num_groups=32 // W, scaling_factor=scaling,
                         shift_factor=shift, force_upcast=False)


def sdxl(root: Path, dtype):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32 // W,
        block_out_channels=tuple(c // W for c in (320, 640, 1280)), attention_head_dim=(5, 10, 20),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, max(1, 10 // L)), cross_attention_dim=2048 // W,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256 // W,
        projection_class_embeddings_input_dim=6 * (256 // W) + 1280 // W)
    te = CLIPTextModel(CLIPTextConfig(**text_cfg(768, 12, 12, 3072)))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg(1280, 32, 20, 5120, proj=1280, act="gelu")))
    tok = clip_tokenizer(root / "tok", model_max_length=77)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae(4, 0.13025), text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=sched)
    return pipe.to(DEVICE, dtype)


def flux(root: Path, dtype):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    net = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=max(1, 19 // L),
                                 num_single_layers=max(1, 38 // L), attention_head_dim=128 // W if W > 1 else 128,
                                 num_attention_heads=24 // W if W > 1 else 24, joint_attention_dim=4096 // W,
                                 pooled_projection_dim=768 // W, axes_dims_rope=(16, 56, 56) if W == 1 else (2, 2, 4))
    te = CLIPTextModel(CLIPTextConfig(**text_cfg(768, 12, 12, 3072)))
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096 // W, d_ff=10240 // W, d_kv=64 // W if W > 1 else 64,
                                 num_heads=64 // W if W > 1 else 64, num_layers=max(1, 24 // L),
                                 feed_forward_proj="gated-gelu"))
    pipe = FluxPipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(16, 0.3611, 0.1159),
                        text_encoder=te, tokenizer=clip_tokenizer(root / "tok", model_max_length=77),
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer(root / "tok5"))
    return pipe.to(DEVICE, dtype)


def measure(name, model, reward, sampler, steps_of_image, unit_steps, rows):
    prompts = ["a photo of a cat"]
    sampler.sample(model, reward, prompts, [0])  # warm-up
    if DEVICE == "cuda":
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = sampler.sample(model, reward, prompts, [1])
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
    per = sec / (unit_steps or out.compute["nfe"])  # per step, or per counted NFE
    rows.append({"setting": name, "peak_gib": peak, "s_per_unit": per, "s_per_image": per * steps_of_image,
                 "nfe": out.compute["nfe"]})
    print(f"| {name} | {peak:.1f} | {per:.2f} | {per * steps_of_image:.0f} |", flush=True)


def main() -> None:
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    rows = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        torch.manual_seed(0)
        t = time.perf_counter()
        clip_h = clip_dir(root, vis_cfg(1280, 32, 16, 5120), text_cfg(1024, 24, 16, 4096, act="gelu"), 1024 // W,
                          head=False)
        clip_l = clip_dir(root, vis_cfg(1024, 24, 16, 4096), text_cfg(768, 12, 12, 3072), 768 // W, head=True)
        print(f"rewards built in {time.perf_counter() - t:.0f} s", flush=True)
        print(f"| setting ({DEVICE}, 16-bit weights, 1 prompt) | peak GiB | s / unit | s / image |")
        print("|---|---|---|---|")
        size = 1024 if not SMALL else 64
        dn = "float16" if DEVICE == "cuda" else "float32"
        pick = PickScore(model=str(clip_h), processor=str(clip_h), dtype=dn).load().to(DEVICE)
        with torch.device(DEVICE):
            pipe = sdxl(root, dtype)
        for name, sampler, ckpt, T in [
            ("SDXL Best-of-4, 1024 px (unit: step, T = 100)", BestOfN(num_particles=4, max_batch=8), False, 100),
            ("SDXL DAS K = 4, grad_batch 1, checkpointing (unit: step, T = 100)",
             SMC(num_particles=4, proposal="gradient", tempering="gamma", gamma=0.008, alpha=0.01, grad_batch=1,
                 max_batch=8), True, 100)]:
            m = StableDiffusion(pretrained="random-sdxl", num_steps=2, guidance_scale=5.0, dtype=dn, height=size,
                                width=size, gradient_checkpointing=ckpt, decode_batch=1)
            m.load_pipeline = lambda: pipe
            measure(name, m.load().to(DEVICE), pick, sampler, T, 2, rows)
            del m
        del pipe, pick
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        aest = AestheticScore(head=str(clip_l / "head.pth"), model=str(clip_l), dtype=dn).load().to(DEVICE)
        with torch.device(DEVICE):
            pipe = flux(root, torch.bfloat16 if DEVICE == "cuda" else torch.float32)
        bdn = "bfloat16" if DEVICE == "cuda" else "float32"
        size = 512 if not SMALL else 64
        for name, sampler, kw, unit, total in [
            ("FLUX.1 schnell RBF, VP-SDE, 512 px (unit: NFE, budget 500)", RBF(budget=32, n0=4, proposal_batch=4),
             {"interpolant": "vp", "diffusion": "square"}, None, 500),
            ("FLUX.1 schnell ODE Best-of-N, max_batch 16, 512 px (unit: NFE, 500)",
             BestOfN(num_particles=16, max_batch=16), {"diffusion": "none"}, None, 500)]:
            m = Flux(pretrained="random-flux", num_steps=10, height=size, width=size, dtype=bdn, **kw)
            m.load_pipeline = lambda: pipe
            measure(name, m.load().to(DEVICE), aest, sampler, total, unit, rows)
            del m
        print(json.dumps({"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "rows": rows}))


if __name__ == "__main__":
    main()
