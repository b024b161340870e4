"""GPU memory and time per step of the SD 1.5 paper settings (DAS K = 4, Best-of-4, SVDD-PM M = 20) at
512 px in float16, on the real SD 1.5 and CLIP ViT-L/14 architectures with random weights built from
config (memory and time do not depend on the weights' values; nothing is downloaded). The pipeline is
saved and loaded through ``StableDiffusion(pretrained=DIR)``, the path a user's checkpoint takes.

    PYTHONPATH=tests python tests/bench_sd15_memory.py [--small]   # --small: a CPU smoke run
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from tiny import clip_tokenizer
from tsf.models import StableDiffusion
from tsf.rewards.clip import AestheticHead, AestheticScore
from tsf.samplers import SMC, SVDD, BestOfN


def build(root: Path, small: bool) -> tuple[Path, Path]:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    w = 1 if not small else 8  # width divisor for the CPU smoke run
    unet = UNet2DConditionModel(sample_size=64 // (w > 1 and 4 or 1), cross_attention_dim=768 // w,
                                block_out_channels=tuple(c // w for c in (320, 640, 1280, 1280)),
                                norm_num_groups=32 // w, attention_head_dim=8)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[c // w for c in (128, 256, 512, 512)], layers_per_block=2,
                        latent_channels=4, norm_num_groups=32 // w, sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768 // w, intermediate_size=3072 // w,
                                        num_hidden_layers=12, num_attention_heads=12 // w,
                                        max_position_embeddings=77, hidden_act="quick_gelu"))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    tok = clip_tokenizer(root / "tok", model_max_length=77)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / "sd15")
    vis = dict(hidden_size=1024 // w, intermediate_size=4096 // w, num_hidden_layers=24, num_attention_heads=16 // w,
               image_size=224, patch_size=14)
    txt = dict(hidden_size=768 // w, intermediate_size=3072 // w, num_hidden_layers=12, num_attention_heads=12 // w,
               vocab_size=49408, max_position_embeddings=77)
    CLIPModel(CLIPConfig(text_config=txt, vision_config=vis, projection_dim=768)).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    torch.save(AestheticHead(768).state_dict(), root / "clip" / "head.pth")
    return root / "sd15", root / "clip"


def main() -> None:
    small = "--small" in sys.argv
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "float16" if device == "cuda" else "float32"
    size = 512 if not small else 64
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        sd, clip = build(Path(d), small)
        print(f"built random SD 1.5 + CLIP ViT-L/14 in {time.perf_counter() - t:.0f} s", flush=True)
        settings = {
            "best_of_n K=4 (T=100)": (BestOfN(num_particles=4, max_batch=8), False, 100),
            "svdd_pm M=20 (T=50)": (SVDD(num_particles=20, max_batch=20), False, 50),
            "das K=4 grad_batch=4 (T=100)": (SMC(num_particles=4, proposal="gradient", tempering="gamma",
                                                 gamma=0.008, alpha=0.005, grad_batch=4, max_batch=8), True, 100),
            "das K=4 grad_batch=1 (T=100)": (SMC(num_particles=4, proposal="gradient", tempering="gamma",
                                                 gamma=0.008, alpha=0.005, grad_batch=1, max_batch=8), True, 100),
        }
        reward = AestheticScore(head=str(clip / "head.pth"), model=str(clip), dtype=dtype).load().to(device)
        rows = []
        print(f"| setting ({device}, {dtype}, {size} px, 1 prompt) | peak GiB | s / step | s / image at T |")
        print("|---|---|---|---|")
        for name, (sampler, ckpt, T) in settings.items():
            steps = 3
            model = StableDiffusion(pretrained=str(sd), num_steps=steps, eta=1.0, guidance_scale=5.0, dtype=dtype,
                                    gradient_checkpointing=ckpt, height=size, width=size, decode_batch=1).load().to(device)
            sampler.sample(model, reward, ["a cat"], [0])  # warm-up
            if device == "cuda":
                torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            sampler.sample(model, reward, ["a dog"], [1])
            if device == "cuda":
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - t) / steps
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            rows.append({"setting": name, "peak_gib": peak, "s_per_step": per_step, "s_per_image": per_step * T})
            print(f"| {name} | {peak:.1f} | {per_step:.2f} | {per_step * T:.0f} |", flush=True)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        print(json.dumps({"device": name, "rows": rows}))


if __name__ == "__main__":
    main()
