"""``tsf bench gpu``: seconds per image, peak memory and denoiser rows of every real-model family at its real
size, with random weights built from the real architectures' configs (written out below; nothing is
downloaded: memory and time do not depend on the weights' values).

Families: SD 1.5 (512 px, aesthetic reward on CLIP ViT-L/14), SDXL (1024 px, PickScore on CLIP ViT-H/14),
SD3 medium (1024 px, aesthetic) and FLUX.1 [schnell] (512 px, aesthetic). Settings of each: the base sampler,
Best-of-4, SVDD-PM with M = 4, DAS with K = 4 at ``grad_batch`` 1 and 4, and one DRaFT-1 optimisation step
(LoRA, the gradient through the last sampling step). Every sampler, kernel and DRaFT setting is read from the
family's ``configs/<family>/*.yaml`` (with K, M, T and the image size set here; a family without its own config
of a method takes SD 1.5's sampler on its own kernel: the flows' SDE kernel of ``svdd.yaml`` for DAS, their
ODE of ``best_of_n.yaml`` for the base sampler, Best-of-4 and DRaFT).

Each family's pipeline is built once on the device in its config's precision and handed to the family's tsf
model class (``StableDiffusion``, ``StableDiffusion3``, ``Flux``) as its pipeline; the rewards are saved and
loaded the way a hub checkpoint is. A row is one warm-up (``--warmup_steps`` steps) and one timed run of one
prompt at ``T = --steps``; its peak memory is ``torch.cuda.max_memory_allocated`` of the timed run (reset
before it; weights included), on a CPU the process's peak RSS; the denoiser rows are counted by
:class:`~tsf.commands.bench.WorkCounter`'s hooks (classifier-free guidance doubles them). The prompt is encoded
once per family, before the timed runs. A denoiser that does not fit is rebuilt with half its transformer
blocks (``blocks`` in the output says so); a row that runs out of memory is reported as such.

``--tiny`` builds every family at a tiny width and depth (64 px) for a CPU check of the whole path in
seconds; without it, no CUDA device is a refusal (a real-size SDXL or FLUX on a CPU takes hours).
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from tsf.commands.bench import (WorkCounter, _import, _proc_status_mb, build, config_path, default_device, machine,
                                machine_line, progress, reset_peak_rss, sync)

PROMPT = "a photo of a cat"


# ----------------------------------------------------------------------------- scales
@dataclass(frozen=True)
class Scale:
    """Divisors of the real architectures' widths (channels, hidden sizes, heads) and depths (layers)."""

    width: int = 1
    depth: int = 1

    def w(self, n: int) -> int:
        return max(1, n // self.width)

    def d(self, n: int) -> int:
        return max(1, n // self.depth)

    @property
    def real(self) -> bool:
        return self.width == 1 and self.depth == 1


REAL, TINY = Scale(1, 1), Scale(16, 4)


# ----------------------------------------------------------------------------- offline tokenizers
def clip_tokenizer(path: Path, model_max_length: int = 77):
    """A ``CLIPTokenizer`` on a byte-level vocabulary with no merges (ids < 514), saved to ``path`` and loaded
    back: the real class and padding (77 tokens), no download."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=model_max_length)
    tok.save_pretrained(str(path))
    return CLIPTokenizer.from_pretrained(str(path))


def t5_tokenizer(path: Path, model_max_length: int = 512):
    """A ``T5TokenizerFast`` on a unigram vocabulary of letters and a few words, saved and loaded back (the
    pipelines pad its output to their ``max_sequence_length``)."""
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["\u2581" + w for w in ("a", "cat", "dog", "horse", "photo", "of", "an", "the", "bird", "monkey")]
    tok = T5TokenizerFast(vocab=[(p, 0.0 if i < 4 else -1.0 - 0.1 * len(p)) for i, p in enumerate(pieces)],
                          extra_ids=0, model_max_length=model_max_length)
    tok.save_pretrained(str(path))
    return T5TokenizerFast.from_pretrained(str(path))


# ----------------------------------------------------------------------------- the real architectures
def clip_text_config(s: Scale, hidden: int, layers: int, heads: int, inter: int, proj: Optional[int] = None,
                     act: str = "quick_gelu") -> dict:
    """A CLIP text tower: ViT-L/14's is ``(768, 12, 12, 3072)``, OpenCLIP bigG's ``(1280, 32, 20, 5120, gelu)``,
    ViT-H/14's ``(1024, 24, 16, 4096, gelu)``."""
    return dict(vocab_size=49408, hidden_size=s.w(hidden), num_hidden_layers=s.d(layers),
                num_attention_heads=s.w(heads), intermediate_size=s.w(inter), max_position_embeddings=77,
                hidden_act=act, **({"projection_dim": s.w(proj)} if proj else {}))


def clip_vision_config(s: Scale, hidden: int, layers: int, heads: int, inter: int) -> dict:
    return dict(hidden_size=s.w(hidden), num_hidden_layers=s.d(layers), num_attention_heads=s.w(heads),
                intermediate_size=s.w(inter), image_size=224, patch_size=14)


CLIP_L = dict(text=(768, 12, 12, 3072), vision=(1024, 24, 16, 4096), proj=768, act="quick_gelu")
CLIP_H = dict(text=(1024, 24, 16, 4096), vision=(1280, 32, 16, 5120), proj=1024, act="gelu")


def clip_dir(s: Scale, root: Path, arch: dict, head: bool) -> Path:
    """A random CLIP model (``CLIP_L`` or ``CLIP_H``) saved in 16 bits with its tokenizer and image-processor
    config, the layout of a hub CLIP checkpoint, and with ``head`` an aesthetic head beside it."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from tsf.rewards.clip import AestheticHead

    path = root / f"clip{arch['proj']}"
    cfg = CLIPConfig(text_config=clip_text_config(s, *arch["text"], act=arch["act"]),
                     vision_config=clip_vision_config(s, *arch["vision"]), projection_dim=s.w(arch["proj"]))
    CLIPModel(cfg).half().cpu().save_pretrained(str(path))
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(str(path))
    clip_tokenizer(path)
    if head:
        torch.save(AestheticHead(s.w(arch["proj"])).cpu().state_dict(), path / "head.pth")
    return path


def vae(s: Scale, latent: int = 4, scaling: float = 0.18215, shift: Optional[float] = None, quant: bool = True):
    """The SD / SDXL / SD3 / FLUX autoencoder (``force_upcast`` as theirs: tsf decodes in float32 under float16)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         block_out_channels=[s.w(c) for c in (128, 256, 512, 512)], layers_per_block=2,
                         latent_channels=latent, norm_num_groups=s.w(32), scaling_factor=scaling,
                         shift_factor=shift, use_quant_conv=quant, use_post_quant_conv=quant)


def t5_encoder(s: Scale):
    """T5 v1.1 XXL's encoder (4.7 B parameters), SD3's and FLUX's third text encoder."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, d_model=s.w(4096), d_ff=s.w(10240), d_kv=s.w(64),
                                   num_heads=s.w(64), num_layers=s.d(24), feed_forward_proj="gated-gelu"))


def sd15_pipeline(s: Scale, root: Path, blocks: Optional[int] = None):
    """Stable Diffusion 1.5: its UNet (860 M), VAE, CLIP ViT-L/14 text encoder and DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=s.w(768),
                                block_out_channels=tuple(s.w(c) for c in (320, 640, 1280, 1280)),
                                norm_num_groups=s.w(32), attention_head_dim=8)
    text = CLIPTextModel(CLIPTextConfig(**clip_text_config(s, *CLIP_L["text"])))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae(s), text_encoder=text, tokenizer=clip_tokenizer(root / "tok"), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sdxl_pipeline(s: Scale, root: Path, blocks: Optional[int] = None):
    """SDXL base 1.0: its UNet (2.6 B), VAE, CLIP ViT-L/14 and OpenCLIP bigG text encoders, Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=s.w(32),
        block_out_channels=tuple(s.w(c) for c in (320, 640, 1280)), attention_head_dim=(5, 10, 20),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, s.d(10)), cross_attention_dim=s.w(2048),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=s.w(256),
        projection_class_embeddings_input_dim=6 * s.w(256) + s.w(1280))
    te = CLIPTextModel(CLIPTextConfig(**clip_text_config(s, *CLIP_L["text"])))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_text_config(s, 1280, 32, 20, 5120, proj=1280, act="gelu")))
    tok = clip_tokenizer(root / "tok")
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae(s, scaling=0.13025), text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=sched)


SD3_BLOCKS = 24  # SD3 medium's joint-attention blocks
FLUX_BLOCKS = 19  # FLUX.1's double-stream blocks (and twice as many single-stream ones)


def sd3_pipeline(s: Scale, root: Path, blocks: Optional[int] = None):
    """Stable Diffusion 3 medium: its MMDiT (2 B, ``blocks`` of its 24 joint blocks), 16-channel VAE, CLIP-L,
    CLIP-G and T5-XXL text encoders, flow-matching scheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    heads, head_dim = s.w(24), s.w(64)
    net = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                                num_layers=s.d(blocks or SD3_BLOCKS), attention_head_dim=head_dim,
                                num_attention_heads=heads, joint_attention_dim=s.w(4096),
                                caption_projection_dim=heads * head_dim, pooled_projection_dim=s.w(768) + s.w(1280),
                                pos_embed_max_size=192)
    te = CLIPTextModelWithProjection(CLIPTextConfig(**clip_text_config(s, *CLIP_L["text"], proj=768)))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_text_config(s, 1280, 32, 20, 5120, proj=1280, act="gelu")))
    tok = clip_tokenizer(root / "tok")
    return StableDiffusion3Pipeline(
        transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(s, 16, 1.5305, 0.0609, quant=False), text_encoder=te, tokenizer=tok, text_encoder_2=te2,
        tokenizer_2=tok, text_encoder_3=t5_encoder(s), tokenizer_3=t5_tokenizer(root / "tok5"))


def flux_pipeline(s: Scale, root: Path, blocks: Optional[int] = None):
    """FLUX.1 [schnell]: its transformer (12 B, ``blocks`` of its 19 double-stream blocks and twice as many of
    its 38 single-stream ones), 16-channel VAE, CLIP-L and T5-XXL text encoders, flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    double = blocks or FLUX_BLOCKS
    net = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=s.d(double),
                                 num_single_layers=s.d(2 * double), attention_head_dim=s.w(128),
                                 num_attention_heads=s.w(24), joint_attention_dim=s.w(4096),
                                 pooled_projection_dim=s.w(768), guidance_embeds=False,
                                 axes_dims_rope=(16, 56, 56) if s.real else (2, 2, s.w(128) - 4))
    te = CLIPTextModel(CLIPTextConfig(**clip_text_config(s, *CLIP_L["text"])))
    return FluxPipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                        vae=vae(s, 16, 0.3611, 0.1159, quant=False), text_encoder=te,
                        tokenizer=clip_tokenizer(root / "tok"), text_encoder_2=t5_encoder(s),
                        tokenizer_2=t5_tokenizer(root / "tok5"))


# ----------------------------------------------------------------------------- families and settings
@dataclass(frozen=True)
class Family:
    key: str
    label: str
    size: int                       # image side, px
    reward: str                     # "aesthetic" (CLIP ViT-L/14) or "pickscore" (CLIP ViT-H/14)
    pipeline: Callable              # (scale, root, blocks) -> diffusers pipeline
    full_blocks: Optional[int]      # the transformer's blocks (None: a UNet, built whole)
    samplers: dict                  # method -> config whose sampler (or DRaFT's init args) it runs
    kernels: dict                   # kernel -> (config whose base model it is, overrides)


def _sd_family(key, label, size, reward, pipeline, svdd, das, draft) -> Family:
    bon = f"configs/{key}/best_of_n.yaml"
    return Family(key, label, size, reward, pipeline, None,
                  samplers={"best_of_n": bon, "svdd": svdd, "das": das, "draft": draft},
                  kernels={"plain": (bon, {}), "svdd": (svdd if svdd.startswith(f"configs/{key}/") else bon, {}),
                           "das": (das, {}), "draft": (draft if draft.startswith(f"configs/{key}/") else das, {})})


def _flow_family(key, label, size, pipeline, blocks) -> Family:
    ode, sde = f"configs/{key}/best_of_n.yaml", f"configs/{key}/svdd.yaml"
    ckpt = {"gradient_checkpointing": True}
    return Family(key, label, size, "aesthetic", pipeline, blocks,
                  samplers={"best_of_n": ode, "svdd": sde, "das": "configs/sd15/das.yaml",
                            "draft": "configs/sd15/draft.yaml"},
                  kernels={"plain": (ode, {}), "svdd": (sde, {}), "das": (sde, ckpt), "draft": (ode, ckpt)})


FAMILIES = {
    "sd15": _sd_family("sd15", "SD 1.5", 512, "aesthetic", sd15_pipeline, "configs/sd15/svdd_pm.yaml",
                       "configs/sd15/das.yaml", "configs/sd15/draft.yaml"),
    "sdxl": _sd_family("sdxl", "SDXL", 1024, "pickscore", sdxl_pipeline, "configs/sd15/svdd_pm.yaml",
                       "configs/sdxl/das.yaml", "configs/sd15/draft.yaml"),
    "sd3": _flow_family("sd3", "SD3 medium", 1024, sd3_pipeline, SD3_BLOCKS),
    "flux": _flow_family("flux", "FLUX.1 schnell", 512, flux_pipeline, FLUX_BLOCKS),
}


@dataclass(frozen=True)
class Setting:
    key: str
    label: str
    kernel: str                     # a key of Family.kernels
    method: Optional[str]           # a key of Family.samplers (None: the base sampler)
    overrides: dict = field(default_factory=dict)


SETTINGS = (
    Setting("base", "base sampler", "plain", None),
    Setting("best_of_4", "Best-of-4", "plain", "best_of_n", {"num_particles": 4}),
    Setting("svdd_pm_4", "SVDD-PM, M = 4", "svdd", "svdd", {"num_particles": 4}),
    Setting("das_4_gb1", "DAS, K = 4, grad_batch 1", "das", "das", {"num_particles": 4, "grad_batch": 1}),
    Setting("das_4_gb4", "DAS, K = 4, grad_batch 4", "das", "das", {"num_particles": 4, "grad_batch": 4}),
    Setting("das_4_tweedie", "DAS, K = 4, grad_batch 4, gradient through Tweedie", "das", "das",
            {"num_particles": 4, "grad_batch": 4, "gradient_through": "tweedie"}),
    Setting("draft_1", "DRaFT-1, one LoRA step", "draft", "draft", {}),  # last: it puts LoRA on the denoiser
)


def _init_args(rel: str) -> dict:
    import yaml

    return yaml.safe_load(config_path(rel).read_text())["model"]["init_args"]


def sampler_of(family: Family, setting: Setting):
    if setting.method is None:
        from tsf.samplers import BaseSampler

        return BaseSampler()
    spec = json.loads(json.dumps(_init_args(family.samplers[setting.method])["sampler"]))
    spec.setdefault("init_args", {}).update(setting.overrides)
    return build(spec)


def draft_args(family: Family) -> dict:
    """DRaFT's own init args of the family's DRaFT config (truncation, lr, rank, grad_clip, ...)."""
    skip = {"base", "reward", "cross_rewards", "prompts", "conditions", "batch_size", "val_samples", "seed"}
    return {k: v for k, v in _init_args(family.samplers["draft"]).items() if k not in skip}


# ----------------------------------------------------------------------------- building
@contextlib.contextmanager
def building_on(device: str, dtype):
    """New tensors on ``device`` in ``dtype`` (a 12 B transformer is never materialised in float32 on the CPU)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def build_pipeline(family: Family, scale: Scale, root: Path, device: str, dtype, blocks: Optional[int]):
    """The family's pipeline on ``device`` in ``dtype``; a transformer that does not fit is rebuilt with half its
    blocks, down to one. Returns the pipeline and its blocks (None: the whole UNet)."""
    from tsf.models.pipelines import prepare_pipeline

    blocks = blocks or family.full_blocks
    while True:
        try:
            with building_on(device, dtype), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipe = family.pipeline(scale, root, blocks)
            return prepare_pipeline(pipe.to(device=device, dtype=dtype)), blocks
        except RuntimeError as e:
            if not is_oom(e) or not blocks or blocks == 1:
                raise
        free(device)  # (out of the except block: the traceback no longer holds the half-built pipeline)
        progress(f"  {family.label}: {blocks} blocks do not fit, trying {blocks // 2}")
        blocks //= 2


def blocks_text(family: Family, blocks: Optional[int], scale: Scale = REAL) -> Optional[str]:
    if family.full_blocks is None:
        return None
    if not scale.real:
        return f"{scale.d(blocks)} (tiny depth)"
    if family.key == "flux":
        return f"{blocks} + {2 * blocks} of {FLUX_BLOCKS} + {2 * FLUX_BLOCKS} (double + single stream)"
    return f"{blocks} of {family.full_blocks}"


def reward_of(family: Family, scale: Scale, root: Path, device: str):
    """The family's reward as its configs have it (float32 weights), on a random CLIP saved and loaded back."""
    import torch

    from tsf.rewards.clip import AestheticScore, PickScore

    with building_on(device, torch.float16 if device.startswith("cuda") else torch.float32):
        pick = family.reward == "pickscore"
        path = clip_dir(scale, root, CLIP_H if pick else CLIP_L, head=not pick)
    if pick:
        return PickScore(model=str(path)).load().to(device)
    return AestheticScore(model=str(path), head=str(path / "head.pth")).load().to(device)


# ----------------------------------------------------------------------------- measuring
@dataclass
class Context:
    family: Family
    pipe: Any
    reward: Any
    prompts: Any                    # the family's PromptTable, shared by its models: the prompt is encoded once
    device: str
    dtype_name: Optional[str]
    size: int
    extra: dict                     # kernel overrides of every model (tiny: the flows' T5 length)


def make_model(ctx: Context, setting: Setting, steps: int):
    """The family's tsf model of the setting's kernel config, at ``steps`` steps, on the shared pipeline."""
    rel, overrides = ctx.family.kernels[setting.kernel]
    spec = json.loads(json.dumps(_init_args(rel)["base"]))
    args = {k: v for k, v in spec.get("init_args", {}).items() if k not in ("variant", "revision", "adapter")}
    args.update(overrides, pretrained=f"random-{ctx.family.key}", num_steps=steps, height=ctx.size, width=ctx.size,
                **ctx.extra, **({"dtype": ctx.dtype_name} if ctx.dtype_name else {}))
    model = _import(spec["class_path"])(**args)
    model.load_pipeline = lambda: ctx.pipe
    model.prompts = ctx.prompts
    model.load()
    if not model.gradient_checkpointing and getattr(model.net, "is_gradient_checkpointing", False):
        model.net.disable_gradient_checkpointing()  # (the shared denoiser keeps what an earlier model enabled)
    return model.to(ctx.device)


def timed(call: Callable[[], Any], counter: WorkCounter, device: str) -> dict:
    """One timed call: seconds, peak memory in GiB (CUDA: ``max_memory_allocated``, the weights included; CPU: the
    peak RSS), what was resident before it, and the work the counter's hooks saw."""
    import torch

    free(device)
    sync(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(torch.device(device))
        resident = torch.cuda.memory_allocated(torch.device(device)) / 2**30
    else:
        reset_peak_rss()
        resident = (_proc_status_mb("VmRSS") or float("nan")) / 1024
    with counter:
        t0 = time.perf_counter()
        out = call()
        sync(device)
        seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(torch.device(device)) / 2**30 if cuda
            else (_proc_status_mb("VmHWM") or float("nan")) / 1024)
    return {"seconds_per_image": seconds, "peak_gib": peak, "resident_gib": resident,
            "counts_per_image": dict(counter.counts), "out": out}  # (one image)


def sampler_row(ctx: Context, setting: Setting, steps: int, warmup_steps: int) -> dict:
    sampler = sampler_of(ctx.family, setting)
    if warmup_steps:
        warm = make_model(ctx, setting, warmup_steps)
        sampler.sample(warm, ctx.reward, [PROMPT], [1000], seed=0)
        del warm
    model = make_model(ctx, setting, steps)
    m = timed(lambda: sampler.sample(model, ctx.reward, [PROMPT], [0], seed=0),
              WorkCounter(model.net, model.vae, ctx.reward), ctx.device)
    out = m.pop("out")
    return {**m, "sampler_repr": repr(sampler), "compute_per_image": {k: float(v) for k, v in out.compute.items()}}


def draft_row(ctx: Context, setting: Setting, steps: int, warmup_steps: int) -> dict:
    """One DRaFT optimisation step (a trajectory of ``steps`` steps, the gradient through the last
    ``truncation``; AdamW on the LoRA adapters) on a batch of one prompt, after one untimed step."""
    import torch

    from baselines import DRaFT

    model = make_model(ctx, setting, steps)
    module = DRaFT(model, reward=ctx.reward, cross_rewards=[], conditions=[PROMPT], batch_size=1, val_samples=1,
                   **draft_args(ctx.family))
    module.configure_model()
    module.to(ctx.device)
    opt = module.configure_optimizers()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = module.training_step(None, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.lora_parameters(), module.grad_clip)
        opt.step()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (self.log without a Trainer)
        if warmup_steps:
            step()
        m = timed(step, WorkCounter(model.net, model.vae, ctx.reward), ctx.device)
    m.pop("out")
    lora = sum(p.numel() for p in module.lora_parameters())
    return {**m, "sampler_repr": f"DRaFT(truncation={module.truncation}, rank={module.rank}, lr={module.lr}), "
                                 f"{lora} LoRA parameters"}


def run_row(ctx: Context, setting: Setting, steps: int, warmup_steps: int) -> dict:
    """The setting's row; running out of memory (or non-finite rewards of random weights) is a row's result."""
    from tsf.samplers.smc import NonFiniteRewardError

    try:
        fn = draft_row if setting.method == "draft" else sampler_row
        return {**fn(ctx, setting, steps, warmup_steps), "error": None}
    except RuntimeError as e:
        if not (is_oom(e) or isinstance(e, NonFiniteRewardError)):
            raise
        error = "out of memory" if is_oom(e) else f"non-finite rewards ({str(e)[:100]})"
    free(ctx.device)
    return {"error": error}


def run_family(family: Family, scale: Scale, steps: int, warmup_steps: int, device: str, dtype_name: Optional[str],
               blocks: Optional[int], deadline: float, root: Path) -> tuple[dict, list[dict]]:
    import torch

    from tsf.loading import resolve_dtype
    from tsf.models.pipelines import PromptTable

    def row_of(setting: Setting, blocks: Optional[int]) -> dict:
        return {"family": family.key, "family_label": family.label, "setting": setting.key, "label": setting.label,
                "steps": steps, "images": 1, "blocks": blocks_text(family, blocks, scale)}

    t0 = time.perf_counter()
    if t0 > deadline:
        skipped = [{**row_of(s, blocks or family.full_blocks), "error": "skipped (--max_minutes reached)"}
                   for s in SETTINGS]
        return {"label": family.label, "skipped": True}, skipped
    dtype_name = dtype_name or _init_args(family.kernels["plain"][0])["base"]["init_args"].get("dtype", "float32")
    progress(f"{family.label}: building the pipeline and the reward ({dtype_name}, random weights)")
    torch.manual_seed(0)
    pipe, blocks = build_pipeline(family, scale, root / family.key, device, resolve_dtype(dtype_name), blocks)
    reward = reward_of(family, scale, root / family.key, device)
    size = family.size if scale.real else 64
    extra = {} if scale.real or family.full_blocks is None else {"max_sequence_length": 32}
    ctx = Context(family, pipe, reward, PromptTable(), device, dtype_name, size, extra)
    info = {"label": family.label, "size": size, "dtype": dtype_name, "reward": reward.name, "skipped": False,
            "blocks": blocks_text(family, blocks, scale), "full_size": blocks == family.full_blocks,
            "build_seconds": time.perf_counter() - t0,
            "sampler_configs": dict(family.samplers), "kernel_configs": {k: v[0] for k, v in family.kernels.items()}}
    rows = []
    for setting in SETTINGS:
        row = row_of(setting, blocks)
        if time.perf_counter() > deadline:
            rows.append({**row, "error": "skipped (--max_minutes reached)"})
            continue
        progress(f"  {family.label}: {setting.label}")
        rows.append({**row, **run_row(ctx, setting, steps, warmup_steps)})
    del ctx, pipe, reward
    free(device)
    return info, rows


# ----------------------------------------------------------------------------- the command
def add_arguments(q) -> None:
    q.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    q.add_argument("--steps", type=int, default=4,
                   help="sampling steps T of every row (default 4: s/image at T' is about T'/T times it)")
    q.add_argument("--warmup_steps", "--warmup-steps", type=int, default=2,
                   help="steps of each row's untimed warm-up run (0: none; DRaFT warms up with one full step)")
    q.add_argument("--tiny", action="store_true", help="tiny widths and depths, 64 px: the whole path on a CPU in "
                                                        "seconds (what the test runs)")
    q.add_argument("--dtype", default=None, help="the weights' precision of every family (default: each family's "
                                                 "config, float16 / FLUX bfloat16; float32 with --tiny)")
    q.add_argument("--blocks", nargs="+", default=[], metavar="FAMILY=N",
                   help="build sd3 / flux with N transformer blocks (flux: N double- and 2N single-stream) instead "
                        "of all (default: all, halved until it fits)")
    q.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default; with --tiny, 1: tiny shapes gain nothing from more threads "
                        "and lose much on a busy machine)")
    q.add_argument("--max_minutes", "--max-minutes", type=float, default=7.5,
                   help="rows not started by then are skipped (marked in the table)")


def parse_blocks(items: list) -> dict:
    out = {}
    for item in items:
        key, _, n = item.partition("=")
        if FAMILIES.get(key) is None or FAMILIES[key].full_blocks is None or not n.isdigit() or int(n) < 1:
            refuse(f"--blocks takes sd3=N or flux=N (N >= 1), got {item!r}")
        out[key] = int(n)
    return out


def refuse(msg: str) -> None:
    print(f"tsf bench gpu: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _gib(v: Optional[float]) -> str:
    return "-" if v is None or v != v else f"{v:.2f}"


def table(rows: list[dict], families: dict, cuda: bool) -> str:
    memory = "peak CUDA GiB" if cuda else "peak RSS GiB"
    lines = [f"| family | setting | s/image | {memory} | UNet / transformer rows per image | grad rows | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        fam = families[r["family"]]
        name = fam["label"] if fam["skipped"] else f"{fam['label']}, {fam['size']} px, {fam['reward']}"
        if r["error"]:
            lines.append(f"| {name} | {r['label']} | - | - | - | - | {r['error']} |")
            continue
        c = r["counts_per_image"]
        notes = [] if fam["full_size"] else [f"blocks {fam['blocks']}"]
        notes += ["batch of 1"] if r["setting"] == "draft_1" else []
        lines.append(f"| {name} | {r['label']} | {r['seconds_per_image']:.3g} | {_gib(r['peak_gib'])} | "
                     f"{c['unet_rows']} | {c['unet_grad_rows']} | {'; '.join(notes)} |")
    return "\n".join(lines)


def gpu(args) -> dict:
    import torch

    if args.steps < 2 or args.warmup_steps < 0:
        refuse("--steps must be >= 2 (DDIM's last step has no noise, so no gradient proposal) and --warmup_steps >= 0")
    blocks = parse_blocks(args.blocks)
    device = args.device or default_device()
    if device == "cpu" and not args.tiny:
        refuse("no CUDA device here: the real-size families take hours on a CPU; run it on a GPU, or pass --tiny "
               "for the tiny CPU check")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.tiny else threads))
    try:
        return _gpu(args, device, blocks)
    finally:
        torch.set_num_threads(threads)


def _gpu(args, device: str, blocks: dict) -> dict:
    scale = TINY if args.tiny else REAL
    dtype = args.dtype or ("float32" if args.tiny else None)
    info = machine(device)
    progress(machine_line(info))
    start = time.perf_counter()
    deadline = start + 60 * args.max_minutes
    families, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="tsf-bench-gpu-") as d:
        for key in args.families:
            families[key], fam_rows = run_family(FAMILIES[key], scale, args.steps, args.warmup_steps, device, dtype,
                                                 blocks.get(key), deadline, Path(d))
            rows.extend(fam_rows)
    total = time.perf_counter() - start
    cuda = device.startswith("cuda")
    size = "tiny widths and depths, 64 px" if args.tiny else "real size"
    warm = f"a {args.warmup_steps}-step warm-up" if args.warmup_steps else "no warm-up"
    print(f"\nReal-model families with random weights ({size}), one prompt, T = {args.steps} steps (s/image at T' "
          f"steps: about T'/T times it), timed after {warm}; the prompt encoded beforehand (the text encoders then "
          f"on the CPU, tsf's default); {total:.0f} s in all")
    print(machine_line(info))
    print()
    print(table(rows, families, cuda))
    for key, fam in families.items():
        if not fam["skipped"] and not fam["full_size"]:
            print(f"\n{fam['label']}: built with {fam['blocks']} transformer blocks to fit this device's memory: its "
                  "denoiser's time and activations scale about with the blocks")
    print("\nrows: the denoiser's input rows per image (classifier-free guidance doubles them); grad rows: those that "
          "built a graph (recomputation by gradient checkpointing, DRaFT's last step's included, is not counted). "
          "Peak memory of the timed run, weights included" + ("" if cuda else " (process RSS)") + ".")
    return {"benchmark": "gpu", "machine": info,
            "settings": {"families": list(args.families), "steps": args.steps, "warmup_steps": args.warmup_steps,
                         "tiny": bool(args.tiny), "dtype": dtype, "prompts": [PROMPT], "device": device,
                         "blocks": blocks, "max_minutes": args.max_minutes, "seconds": total,
                         "memory": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM)"},
            "families": families, "rows": rows}
