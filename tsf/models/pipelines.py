"""Real text-to-image models through diffusers, behind the Gaussian-kernel interface.

* :class:`StableDiffusion`: SD 1.x / 2.x and SDXL (eps or v prediction, DDIM with ``eta``,
  classifier-free guidance), an :class:`~tsf.models.diffusion.EpsDiffusionModel` on the UNet;
* :class:`StableDiffusion3` and :class:`Flux`: rectified flows, a :class:`~tsf.models.flow.FlowModel`
  on the transformer, so that the Linear-SDE, the VP-SDE and RBF apply to them unchanged.

Everything loads with ``DiffusionPipeline.from_pretrained`` from a hub name or a local
directory (nothing at construction: a config validates without reading a file). The state
``x`` is the latent (``[C, H / 8, W / 8]``; FLUX's is unpacked, and packed only around the
transformer call). Conditions are prompts: :meth:`encode_conditions` encodes each distinct prompt
once with the pipeline's own ``encode_prompt`` and returns per-row indices into that table, so
that the K particles of a prompt share one encoding and a sampler indexes and repeats ``c``
like any class label. With guidance, every row is paired with its own conditional and
unconditional (negative-prompt) embeddings in one batched call. :meth:`decode` runs the VAE
in chunks of ``decode_batch`` rows (checkpointed with ``gradient_checkpointing``), so that the
gradient samplers (DAS, DPS) and DRaFT can backpropagate through it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tsf.errors import ConfigError
from tsf.loading import resolve_dtype
from tsf.models.base import classifier_free_guidance
from tsf.models.diffusion import EpsDiffusionModel
from tsf.models.flow import FlowModel



class PromptTable(nn.Module):
    """The encodings of the prompts seen so far, one row each (``conditional`` and ``null`` parts)."""

    def __init__(self) -> None:
        super().__init__()
        self.index: dict[str, int] = {}
        self.rows: dict[str, list[Tensor]] = {}

    def lookup(self, prompts: Sequence[str], encode) -> list[int]:
        """Indices of ``prompts``, encoding (with ``encode(list_of_new_prompts) -> {name: [n, ...]}``) the new ones."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.index]
        if new:
            with torch.no_grad():
                encoded = encode(new)
            for name, value in encoded.items():
                self.rows.setdefault(name, []).extend(value.detach().unbind(0))
            for p in new:
                self.index[p] = len(self.index)
        return [self.index[p] for p in prompts]

    def get(self, name: str, idx: Tensor) -> Tensor:
        """The ``name`` encodings of rows ``idx``, on ``idx``'s device."""
        rows = self.rows[name]
        return torch.stack([rows[int(i)] for i in idx.tolist()]).to(idx.device)


@contextlib.contextmanager
def _quiet_loading():
    """No per-component loading bars (they flood logs; the sampling bar is the one that counts)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.enable_progress_bar(), tlog.enable_progress_bar()


def as_prompts(conditions: Sequence[Any]) -> list[str]:
    prompts = []
    for c in conditions:
        if c is None:
            prompts.append("")
        elif isinstance(c, str):
            prompts.append(c)
        else:
            raise ConfigError(f"text-to-image models take prompts (strings) as conditions, got {c!r}")
    return prompts


class _Pipeline:
    """What the three families share: loading, the prompt table, chunked VAE decoding, precision."""

    pipeline_class: str = "DiffusionPipeline"

    def _init_pipeline(self, pretrained: str, dtype: str, decode_batch: int, gradient_checkpointing: bool,
                       adapter: Optional[str], variant: Optional[str], height: Optional[int],
                       width: Optional[int], negative_prompt: str, batch_invariant: bool) -> None:
        resolve_dtype(dtype)
        if decode_batch < 1:
            raise ConfigError(f"decode_batch must be >= 1, got {decode_batch}")
        for name, v in (("height", height), ("width", width)):
            if v is not None and (v < 8 or v % 8):
                raise ConfigError(f"{name} must be a positive multiple of 8, got {v}")
        self.pretrained, self.dtype_name, self.decode_batch = pretrained, dtype, int(decode_batch)
        self.gradient_checkpointing, self.adapter, self.variant = gradient_checkpointing, adapter, variant
        self.height, self.width, self.negative_prompt = height, width, negative_prompt
        self.batch_invariant = bool(batch_invariant)
        self.prompts = PromptTable()
        self._pipe = None  # not a submodule: its parts are registered one by one in _load

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype_name)

    def load_pipeline(self):
        """``DiffusionPipeline.from_pretrained(pretrained)``: a hub name or a local directory."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        kwargs = {"torch_dtype": self.torch_dtype}
        if self.variant:
            kwargs["variant"] = self.variant
        try:
            with warnings.catch_warnings(), _quiet_loading():
                warnings.simplefilter("ignore", FutureWarning)  # diffusers renames torch_dtype to dtype
                pipe = cls.from_pretrained(self.pretrained, **kwargs)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"cannot load {self.pipeline_class} from {self.pretrained!r} ({type(e).__name__}: {str(e)[:300]}). "
                "Give a hub name that is downloaded (or downloadable: HF_HUB_OFFLINE unset, logged in for gated "
                "models) or a local directory saved with save_pretrained, in the model's `pretrained`.") from e
        pipe.set_progress_bar_config(disable=True)
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            part = getattr(pipe, name, None)
            if part is not None:
                part.requires_grad_(False).eval()
        return pipe

    def attach(self, pipe, denoiser: nn.Module) -> nn.Module:
        """Register the denoiser (with its LoRA adapter and checkpointing) and the VAE as submodules."""
        denoiser.requires_grad_(False).eval()
        if self.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        if self.adapter:
            from peft import PeftModel

            denoiser = PeftModel.from_pretrained(denoiser, self.adapter)
        self._pipe = pipe
        if self.torch_dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (its pipeline upcasts it the same way)
        self.vae = pipe.vae  # submodules, so that .to(device) moves them with the denoiser
        self.text_encoders = nn.ModuleList([getattr(pipe, n) for n in ("text_encoder", "text_encoder_2",
                                                                        "text_encoder_3") if getattr(pipe, n, None)])
        return denoiser

    def image_size(self, pipe, sample_size: int) -> tuple[int, int]:
        scale = pipe.vae_scale_factor
        return (self.height or sample_size * scale, self.width or sample_size * scale)

    def _denoiser_call(self, fn, *tensors: Tensor) -> Tensor:
        """Call the denoiser in its dtype on float32 latents and return float32."""
        out = fn(*(t.to(self.torch_dtype) if torch.is_floating_point(t) else t for t in tensors))
        return out.float()

    def check_conditions(self, conditions: Sequence[Any]) -> None:
        as_prompts(conditions)

    def paired(self, name: str, c: Tensor) -> Tensor:
        """The ``name`` encodings of rows ``c``. Under classifier-free guidance the rows come as
        ``[c; c]`` (see :func:`~tsf.models.base.classifier_free_guidance`): the first half gets the
        prompts' encodings, the second half, their unconditional twins, the ``neg_<name>`` ones."""
        if self.guidance_scale == 1.0:
            return self.prompts.get(name, c)
        n = len(c) // 2
        return torch.cat([self.prompts.get(name, c[:n]), self.prompts.get(f"neg_{name}", c[n:])])

    def encode_conditions(self, conditions: Sequence[Any]) -> Tensor:
        idx = self.prompts.lookup(as_prompts(conditions), self.encode_prompts)
        return torch.tensor(idx, dtype=torch.long, device=self.device)

    def latents_to_images(self, z: Tensor) -> Tensor:
        """One VAE decode of a chunk of latents (already unscaled) to images in [0, 1]."""
        img = self.vae.decode(z.to(self.vae.dtype)).sample
        return ((img.float() + 1) / 2).clamp(0, 1)

    def decode(self, x0: Tensor) -> Tensor:
        z = self.unscale_latents(x0)
        parts = []
        for chunk in z.split(self.decode_batch):
            if self.gradient_checkpointing and torch.is_grad_enabled() and chunk.requires_grad:
                parts.append(checkpoint(self.latents_to_images, chunk, use_reentrant=False))
            else:
                parts.append(self.latents_to_images(chunk))
        return torch.cat(parts)

    def unscale_latents(self, x0: Tensor) -> Tensor:
        cfg = self.vae.config
        z = x0 / cfg.scaling_factor
        shift = getattr(cfg, "shift_factor", None)
        return z + shift if shift else z

    def cache_key(self) -> str:
        return f"{type(self).__name__}({self.pretrained}, {self.extra_repr()})"


class StableDiffusion(_Pipeline, EpsDiffusionModel):
    """Stable Diffusion 1.x / 2.x or SDXL (by what ``pretrained`` holds), on a DDIM kernel.

    Args:
        pretrained: hub name (``stable-diffusion-v1-5/stable-diffusion-v1-5``,
            ``stabilityai/stable-diffusion-xl-base-1.0``) or a local pipeline directory.
        num_steps, eta, scheduler: the DDIM kernel (``eta = 1``: DDPM's variance).
        guidance_scale: classifier-free guidance ``w`` (1: none).
        negative_prompt: the unconditional prompt of guidance (default: the pipeline's, the empty
            prompt; SDXL zeroes its embeddings as its pipeline does).
        height, width: image size (default: the UNet's native size).
        dtype: weights' precision (``float16``/``bfloat16`` on GPUs); latents stay float32.
        decode_batch: rows per VAE decode.
        gradient_checkpointing: checkpoint the UNet and the VAE decode (gradient samplers, DRaFT).
        adapter: a peft LoRA adapter directory (``tsf finetune``'s ``adapter``) loaded on the UNet.
        variant: the weights' variant (``fp16``), as diffusers names it.
        batch_invariant: pad calls on fewer than 16 rows to 16 rows, so that a sample is bitwise the same
            whatever batch or process draws it; off by default: it computes up to 16x the rows the method needs.
    """

    pipeline_class = "DiffusionPipeline"

    def __init__(self, pretrained: str, num_steps: int = 50, eta: float = 1.0, guidance_scale: float = 7.5,
                 negative_prompt: Optional[str] = None, height: Optional[int] = None, width: Optional[int] = None,
                 scheduler: Literal["ddim", "ddpm"] = "ddim", dtype: str = "float32", decode_batch: int = 8,
                 gradient_checkpointing: bool = False, adapter: Optional[str] = None,
                 variant: Optional[str] = None, batch_invariant: bool = False) -> None:
        EpsDiffusionModel.__init__(self, None, None, scheduler=scheduler, num_steps=num_steps, eta=eta,
                                   guidance_scale=guidance_scale, sample_shape=(4, 64, 64))
        self._init_pipeline(pretrained, dtype, decode_batch, gradient_checkpointing, adapter, variant, height,
                            width, negative_prompt, batch_invariant)

    def extra_repr(self) -> str:
        return (f"pretrained={self.pretrained}, dtype={self.dtype_name}, height={self.height}, width={self.width}, "
                f"negative_prompt={self.negative_prompt!r}, " + super().extra_repr())

    def _load(self) -> None:
        pipe = self.load_pipeline()
        unet = pipe.unet
        self.xl = hasattr(pipe, "text_encoder_2")
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"{self.pretrained}: prediction_type {self.prediction_type!r} is not supported")
        config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
        config = {k: config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                         "trained_betas", "steps_offset", "timestep_spacing", "set_alpha_to_one",
                                         "rescale_betas_zero_snr") if k in config}
        config["prediction_type"] = self.prediction_type
        self.set_schedule(config)
        self.net = self.attach(pipe, unet)
        h, w = self.image_size(pipe, unet.config.sample_size)
        self.image_hw = (h, w)
        self.sample_shape = (unet.config.in_channels, h // pipe.vae_scale_factor, w // pipe.vae_scale_factor)

    @property
    def guided(self) -> bool:
        return True

    def null(self, c: Tensor) -> Tensor:
        return c  # the table holds each prompt's unconditional encoding beside its conditional one

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        pipe, device = self._pipe, self.device
        neg = None if self.negative_prompt is None else [self.negative_prompt] * len(prompts)
        if not self.xl:
            emb, neg_emb = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=neg)
            return {"emb": emb, "neg_emb": neg_emb}
        emb, neg_emb, pooled, neg_pooled = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=neg)
        return {"emb": emb, "neg_emb": neg_emb, "pooled": pooled, "neg_pooled": neg_pooled}

    def denoise(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        emb = self.paired("emb", c)
        kwargs = {}
        if self.xl:
            pooled = self.paired("pooled", c)
            h, w = self.image_hw
            proj = self._pipe.text_encoder_2.config.projection_dim
            time_ids = self._pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=emb.dtype,
                                                    text_encoder_projection_dim=proj).to(x.device)
            pooled = pooled.to(self.torch_dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.expand(len(c), -1)}
        return self._denoiser_call(lambda xs, ts, e: self.net(xs, ts, encoder_hidden_states=e, **kwargs).sample,
                                   x, t, emb)


class _FlowPipeline(_Pipeline, FlowModel):
    """The flow families (SD3, FLUX): a velocity ``u_t`` on the linear path with ``t`` = sigma."""

    def __init__(self, pretrained: str, num_steps: int, interpolant: str, diffusion: str, diffusion_norm: float,
                 time_grid: Optional[str], shift: Optional[float], guidance_scale: float, negative_prompt: str,
                 height: Optional[int], width: Optional[int], dtype: str, decode_batch: int,
                 gradient_checkpointing: bool, adapter: Optional[str], variant: Optional[str],
                 max_sequence_length: int, batch_invariant: bool, last_step: Optional[str]) -> None:
        FlowModel.__init__(self, None, num_steps=num_steps, interpolant=interpolant, diffusion=diffusion,
                           diffusion_norm=diffusion_norm, time_grid=time_grid, sample_shape=(16, 128, 128),
                           shift=shift or 1.0, last_step=last_step)
        self._init_pipeline(pretrained, dtype, decode_batch, gradient_checkpointing, adapter, variant, height,
                            width, negative_prompt, batch_invariant)
        self.shift_option, self.guidance_scale = shift, float(guidance_scale)
        self.max_sequence_length = int(max_sequence_length)

    def extra_repr(self) -> str:
        return (f"pretrained={self.pretrained}, dtype={self.dtype_name}, height={self.height}, width={self.width}, "
                f"guidance_scale={self.guidance_scale}, " + super().extra_repr())

    def _load(self) -> None:
        pipe = self.load_pipeline()
        net = pipe.transformer
        self.net = self.attach(pipe, net)
        h, w = self.image_size(pipe, pipe.default_sample_size)  # SD3: the transformer's; FLUX.1: 128
        self.image_hw = (h, w)
        f = pipe.vae_scale_factor
        self.sample_shape = (pipe.vae.config.latent_channels, h // f, w // f)
        self.set_grid(self.shift_option if self.shift_option is not None else self.scheduler_shift(pipe))

    def scheduler_shift(self, pipe) -> float:
        """The scheduler's time shift: its ``shift``, or with dynamic shifting FLUX's resolution rule
        ``exp(mu)``, ``mu`` linear in the number of image tokens."""
        cfg = pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return float(cfg.get("shift", 1.0))
        tokens = self.sample_shape[1] * self.sample_shape[2] // 4
        lo, hi = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        b0, b1 = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        mu = b0 + (b1 - b0) * (tokens - lo) / (hi - lo)
        return math.exp(mu)


class StableDiffusion3(_FlowPipeline):
    """Stable Diffusion 3 / 3.5 (MMDiT rectified flow) as a :class:`~tsf.models.flow.FlowModel`.

    Args:
        pretrained: hub name (``stabilityai/stable-diffusion-3-medium-diffusers``) or a local directory.
        num_steps, interpolant, diffusion, diffusion_norm, time_grid, last_step: the flow kernel
            (:class:`~tsf.models.flow.FlowModel`; ``diffusion: none`` is the ODE).
        shift: the time shift (default: the scheduler's, 3.0 for SD3).
        guidance_scale: classifier-free guidance on the velocity (1: none).
        max_sequence_length: T5 tokens.
        (the rest as :class:`StableDiffusion`)
    """

    def __init__(self, pretrained: str, num_steps: int = 28, interpolant: Literal["linear", "vp"] = "linear",
                 diffusion: Literal["square", "linear", "constant", "none"] = "square", diffusion_norm: float = 3.0,
                 time_grid: Optional[Literal["uniform", "reference"]] = None, shift: Optional[float] = None,
                 guidance_scale: float = 7.0, negative_prompt: Optional[str] = None, height: Optional[int] = None,
                 width: Optional[int] = None, dtype: str = "float32", decode_batch: int = 8,
                 gradient_checkpointing: bool = False, adapter: Optional[str] = None, variant: Optional[str] = None,
                 max_sequence_length: int = 256, batch_invariant: bool = False,
                 last_step: Optional[Literal["tweedie", "euler"]] = None) -> None:
        super().__init__(pretrained, num_steps, interpolant, diffusion, diffusion_norm, time_grid, shift,
                         guidance_scale, negative_prompt, height, width, dtype, decode_batch,
                         gradient_checkpointing, adapter, variant, max_sequence_length, batch_invariant, last_step)

    pipeline_class = "StableDiffusion3Pipeline"

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        neg = None if self.negative_prompt is None else [self.negative_prompt] * len(prompts)
        emb, neg_emb, pooled, neg_pooled = self._pipe.encode_prompt(
            prompts, prompts, prompts, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=neg, negative_prompt_2=neg, negative_prompt_3=neg,
            max_sequence_length=self.max_sequence_length)
        return {"emb": emb, "neg_emb": neg_emb, "pooled": pooled, "neg_pooled": neg_pooled}

    def velocity(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        if self.guidance_scale == 1.0:
            return self._velocity(x, t, c)
        return classifier_free_guidance(self._velocity, x, t, c, c, self.guidance_scale)

    def _velocity(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        fn = lambda xs, ts, e, p: self.net(hidden_states=xs, timestep=ts, encoder_hidden_states=e,  # noqa: E731
                                           pooled_projections=p).sample
        return self._denoiser_call(fn, x, t * 1000, self.paired("emb", c), self.paired("pooled", c))


class Flux(_FlowPipeline):
    """FLUX.1 [schnell] / [dev] (rectified flow) as a :class:`~tsf.models.flow.FlowModel`.

    The latent is kept unpacked (``[16, H / 8, W / 8]``) and packed into 2x2 patches only around
    the transformer call. [dev] is guidance-distilled: ``guidance_scale`` is the embedded
    guidance (3.5), one call per row; [schnell] has none.

    Args:
        pretrained: hub name (``black-forest-labs/FLUX.1-schnell``) or a local directory.
        num_steps, interpolant, diffusion, diffusion_norm, time_grid, shift, last_step: the flow kernel
            (shift default: the scheduler's; FLUX.1 [dev]'s resolution-dependent rule).
        guidance_scale: FLUX.1 [dev]'s embedded guidance (ignored by models without it).
        max_sequence_length: T5 tokens (schnell: at most 256).
        (the rest as :class:`StableDiffusion`)
    """

    pipeline_class = "FluxPipeline"

    def __init__(self, pretrained: str, num_steps: int = 4, interpolant: Literal["linear", "vp"] = "linear",
                 diffusion: Literal["square", "linear", "constant", "none"] = "square", diffusion_norm: float = 3.0,
                 time_grid: Optional[Literal["uniform", "reference"]] = None, shift: Optional[float] = None,
                 guidance_scale: float = 3.5, height: Optional[int] = None, width: Optional[int] = None,
                 dtype: str = "float32", decode_batch: int = 8, gradient_checkpointing: bool = False,
                 adapter: Optional[str] = None, variant: Optional[str] = None,
                 max_sequence_length: int = 256, batch_invariant: bool = False,
                 last_step: Optional[Literal["tweedie", "euler"]] = None) -> None:
        super().__init__(pretrained, num_steps, interpolant, diffusion, diffusion_norm, time_grid, shift,
                         guidance_scale, None, height, width, dtype, decode_batch, gradient_checkpointing, adapter,
                         variant, max_sequence_length, batch_invariant, last_step)

    def _load(self) -> None:
        super()._load()
        pipe = self._pipe
        _, lh, lw = self.sample_shape
        if lh % 2 or lw % 2:
            raise ConfigError(f"FLUX packs 2x2 latent patches: height and width must be multiples of "
                              f"{2 * pipe.vae_scale_factor}")

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        emb, pooled, _ = self._pipe.encode_prompt(prompts, prompts, device=self.device, num_images_per_prompt=1,
                                                  max_sequence_length=self.max_sequence_length)
        return {"emb": emb, "pooled": pooled}

    def velocity(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        pipe = self._pipe
        n, ch, lh, lw = x.shape
        packed = pipe._pack_latents(x, n, ch, lh, lw)
        img_ids = pipe._prepare_latent_image_ids(n, lh // 2, lw // 2, x.device, self.torch_dtype)
        emb, pooled = self.prompts.get("emb", c), self.prompts.get("pooled", c)
        txt_ids = torch.zeros(emb.shape[1], 3, device=x.device, dtype=self.torch_dtype)
        guidance = None
        if getattr(self.net.config, "guidance_embeds", False):
            guidance = torch.full((n,), self.guidance_scale, device=x.device, dtype=torch.float32)

        def fn(xs, ts, e, p):
            return self.net(hidden_states=xs, timestep=ts, guidance=guidance, pooled_projections=p,
                            encoder_hidden_states=e, txt_ids=txt_ids, img_ids=img_ids).sample

        u = self._denoiser_call(fn, packed, t * 1000 / 1000, emb, pooled)  # the pipeline's rounding of t
        h, w = lh * pipe.vae_scale_factor, lw * pipe.vae_scale_factor
        return pipe._unpack_latents(u, h, w, pipe.vae_scale_factor)
