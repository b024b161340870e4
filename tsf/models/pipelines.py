"""Real text-to-image models through diffusers, behind the Gaussian-kernel interface.

* :class:`StableDiffusion`: SD 1.x / 2.x and SDXL (eps or v prediction, DDIM with ``eta``,
  classifier-free guidance), an :class:`~tsf.models.diffusion.EpsDiffusionModel` on the UNet;
* :class:`StableDiffusion3` and :class:`Flux`: rectified flows, a :class:`~tsf.models.flow.FlowModel`
  on the transformer, so that the Linear-SDE, the VP-SDE and RBF apply to them unchanged. They sample on
  their pipeline's own time grid: the ``sigmas`` of its scheduler's ``set_timesteps``, called as the
  pipeline calls it (the scheduler's ``shift``, ``use_dynamic_shifting`` with ``mu`` from the pipeline's
  ``calculate_shift``, ``shift_terminal``), on the base points of ``time_grid``.

Everything loads with ``DiffusionPipeline.from_pretrained`` from a hub name (at a ``revision``) or a local
directory (nothing at construction: a config validates without reading a file). The state
``x`` is the latent (``[C, H / 8, W / 8]``; FLUX's is unpacked, and packed only around the
transformer call). Conditions are prompts: :meth:`encode_conditions` encodes each distinct prompt
once with the pipeline's own ``encode_prompt`` and returns per-row indices into that table, so
that the K particles of a prompt share one encoding and a sampler indexes and repeats ``c``
like any class label. With guidance, every row is paired with its own conditional and
unconditional (negative-prompt) embeddings in one batched call. :meth:`decode` runs the VAE
in chunks of ``decode_batch`` rows (checkpointed with ``gradient_checkpointing``), so that the
gradient samplers (DAS, DPS) and DRaFT can backpropagate through it.

Memory: the text encoders are not submodules, so moving the model to a GPU leaves them on the CPU;
they visit the model's device only while they encode new prompts (``keep_text_encoders_on_device``
keeps them there). ``cpu_offload`` installs diffusers' model CPU offload (``enable_model_cpu_offload``:
accelerate hooks that bring each component to the GPU when it is called and send the previous one
back), for gradient-free sampling.

LoRA: ``adapter`` loads through the pipeline's own ``load_lora_weights`` (diffusers' format,
``pytorch_lora_weights.safetensors``, as diffusers' training scripts and ``tsf finetune`` save it),
or a peft adapter directory (``adapter_config.json``: what ``tsf finetune`` wrote before). The
fine-tuning baselines inject and save adapters with :meth:`_Pipeline.add_lora` and
:meth:`_Pipeline.save_lora`, the way diffusers' training scripts do.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tsf.errors import ConfigError
from tsf.loading import resolve_dtype
from tsf.models.base import classifier_free_guidance
from tsf.models.diffusion import EpsDiffusionModel
from tsf.models.flow import FlowModel

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
#: the LoRA weights' file of diffusers' format (``save_lora_weights``' default name)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


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
def _quiet_loading(warnings_too: bool = False):
    """No per-component loading bars (they flood logs; the sampling bar is the one that counts); with
    ``warnings_too``, no diffusers warnings either (``load_lora_weights`` warns of every component of
    the pipeline that a LoRA does not touch)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    level = dlog.get_verbosity()
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    if warnings_too:
        dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)
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


# -- FLUX's latent layout, written out: its pipeline's _pack_latents, _unpack_latents and
# _prepare_latent_image_ids are private, so tsf does not call them (the tests compare against them)
def pack_latents(x: Tensor) -> Tensor:
    """Latents ``[N, C, H, W]`` as FLUX's sequence of 2x2 patches ``[N, H W / 4, 4 C]``."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(u: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_latents`: ``[N, H W / 4, 4 C]`` to ``[N, C, H, W]``."""
    n, _, c4 = u.shape
    return u.view(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, h, w)


def latent_image_ids(h: int, w: int, device, dtype) -> Tensor:
    """FLUX's positions of the ``h x w`` patches, ``[h w, 3]`` rows ``(0, row, column)``."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def prepare_pipeline(pipe):
    """A loaded pipeline as tsf samples with it: no progress bar, the VAE and text encoders frozen in eval mode."""
    pipe.set_progress_bar_config(disable=True)
    for name in ("vae", *TEXT_ENCODERS):
        part = getattr(pipe, name, None)
        if part is not None:
            part.requires_grad_(False).eval()
    return pipe


#: the keys of a quantization config given as a mapping: diffusers' ``PipelineQuantizationConfig`` arguments, or a
#: ``class_path`` / ``init_args`` of one model's quantization config (``diffusers.TorchAoConfig``, ...)
QUANTIZATION_KEYS = ("quant_backend", "quant_kwargs", "components_to_quantize", "class_path", "init_args")


def check_quantization_config(config: Any) -> None:
    """Refuse, before anything loads, a ``quantization_config`` mapping with keys neither form takes."""
    if isinstance(config, dict):
        unknown = sorted(set(config) - set(QUANTIZATION_KEYS))
        if unknown or not config:
            raise ConfigError(
                f"quantization_config takes diffusers' PipelineQuantizationConfig arguments (quant_backend, quant_kwargs, "
                f"components_to_quantize) or a class_path with init_args (diffusers.TorchAoConfig, "
                f"diffusers.BitsAndBytesConfig, ...); got keys {unknown or '(none)'}")
        if "class_path" in config and "quant_backend" in config:
            raise ConfigError("quantization_config takes either quant_backend (with quant_kwargs) or a class_path, "
                              "not both")


def _instantiate(spec: Any) -> Any:
    """``class_path`` / ``init_args`` mappings (at any depth) as instances, as a config file writes objects
    (``quant_type: {class_path: torchao.quantization.Int8WeightOnlyConfig}``)."""
    if isinstance(spec, dict):
        if "class_path" in spec:
            module, _, name = str(spec["class_path"]).rpartition(".")
            cls = getattr(importlib.import_module(module or "diffusers"), name)
            return cls(**_instantiate(spec.get("init_args") or {}))
        return {k: _instantiate(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_instantiate(v) for v in spec]
    return spec


def pipeline_quantization_config(config: Any, denoiser: str):
    """``config`` as what ``DiffusionPipeline.from_pretrained`` takes: a ``PipelineQuantizationConfig`` as is; one
    model's quantization config (``BitsAndBytesConfig``, ``TorchAoConfig``, ``GGUFQuantizationConfig``, ...) for the
    denoiser (``quant_mapping={denoiser: config}``); a mapping of ``PipelineQuantizationConfig``'s arguments
    (``components_to_quantize`` defaulting to the denoiser) or a ``class_path`` with its ``init_args`` (a config
    file's form of the two before)."""
    from diffusers import PipelineQuantizationConfig

    if isinstance(config, PipelineQuantizationConfig):
        return config
    try:
        if isinstance(config, dict):
            config = _instantiate(config)
            if not isinstance(config, dict):
                return pipeline_quantization_config(config, denoiser)
            return PipelineQuantizationConfig(**{"components_to_quantize": [denoiser], **config})
        return PipelineQuantizationConfig(quant_mapping={denoiser: config})
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        raise ConfigError(f"quantization_config {config!r} cannot be used ({type(e).__name__}: {str(e)[:300]}): "
                          "install the backend it names (bitsandbytes, torchao, gguf, optimum-quanto) or choose one "
                          "that is installed") from e


class _Pipeline:
    """What the three families share: loading, the prompt table, chunked VAE decoding, precision, text-encoder
    placement and offloading, LoRA adapters in diffusers' format."""

    pipeline_class: str = "DiffusionPipeline"
    #: the pipeline's attribute holding the denoiser (and the prefix of ``save_lora_weights``' keywords)
    denoiser_name: str = "unet"
    #: whether the LoRA keys are renamed with ``convert_state_dict_to_diffusers`` before they are saved, as
    #: diffusers' UNet training scripts do (its SD3 and FLUX scripts save peft's key names)
    lora_diffusers_keys: bool = True

    def _init_pipeline(self, pretrained: str, *, dtype: str, decode_batch: int, gradient_checkpointing: bool,
                       adapter: Optional[str], variant: Optional[str], revision: Optional[str],
                       height: Optional[int], width: Optional[int], negative_prompt: Optional[str],
                       batch_invariant: bool, keep_text_encoders_on_device: bool,
                       cpu_offload: Union[bool, str], local_files_only: bool = False, cache_dir: Optional[str] = None,
                       token: Union[bool, str, None] = None, use_safetensors: Optional[bool] = None,
                       device_map: Optional[str] = None, quantization_config: Any = None) -> None:
        resolve_dtype(dtype)
        if decode_batch < 1:
            raise ConfigError(f"decode_batch must be >= 1, got {decode_batch}")
        for name, v in (("height", height), ("width", width)):
            if v is not None and (v < 8 or v % 8):
                raise ConfigError(f"{name} must be a positive multiple of 8, got {v}")
        if cpu_offload in ("", None):  # (an emptied config field)
            cpu_offload = False
        if isinstance(cpu_offload, str):
            try:
                torch.device(cpu_offload)
            except RuntimeError as e:
                raise ConfigError(f"cpu_offload takes true, false or a device name (cuda:1), got {cpu_offload!r}") from e
        self.pretrained, self.dtype_name, self.decode_batch = pretrained, dtype, int(decode_batch)
        self.gradient_checkpointing, self.adapter, self.variant = gradient_checkpointing, adapter, variant
        self.revision = revision
        self.height, self.width, self.negative_prompt = height, width, negative_prompt
        self.batch_invariant = bool(batch_invariant)
        self.keep_text_encoders_on_device = bool(keep_text_encoders_on_device)
        self.cpu_offload = cpu_offload
        check_quantization_config(quantization_config)
        #: what ``from_pretrained`` is given beside the dtype, variant and revision (the options diffusers users pass)
        self.loading = {k: v for k, v in (("local_files_only", bool(local_files_only) or None), ("cache_dir", cache_dir),
                                          ("token", token), ("use_safetensors", use_safetensors),
                                          ("device_map", device_map), ("quantization_config", quantization_config))
                        if v is not None and v != ""}
        self._offload_device: Optional[torch.device] = None
        self._text_encoders: list[nn.Module] = []  # not submodules (see attach)
        self.prompts = PromptTable()
        self._pipe = None  # not a submodule: its parts are registered one by one in _load

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype_name)

    @property
    def device(self) -> torch.device:
        """Where the states live: the model's parameters' device, or under ``cpu_offload`` the device the hooks
        bring each component to (its parameters sit on the CPU between calls)."""
        offload = getattr(self, "_offload_device", None)
        return offload if offload is not None else super().device

    def load_pipeline(self):
        """``DiffusionPipeline.from_pretrained(pretrained)``: a hub name or a local directory."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        kwargs = {"torch_dtype": self.torch_dtype}
        if self.variant:
            kwargs["variant"] = self.variant
        if self.revision:
            kwargs["revision"] = self.revision
        kwargs.update(self.loading)
        if "cache_dir" in kwargs:
            kwargs["cache_dir"] = os.path.expanduser(str(kwargs["cache_dir"]))
        if "quantization_config" in kwargs:
            kwargs["quantization_config"] = pipeline_quantization_config(kwargs["quantization_config"],
                                                                         self.denoiser_name)
        try:
            with warnings.catch_warnings(), _quiet_loading():
                warnings.simplefilter("ignore", FutureWarning)  # diffusers renames torch_dtype to dtype
                pipe = cls.from_pretrained(self.pretrained, **kwargs)
        except (OSError, ValueError) as e:
            where = f" (cache_dir {kwargs['cache_dir']!r})" if "cache_dir" in kwargs else ""
            raise ConfigError(
                f"cannot load {self.pipeline_class} from {self.pretrained!r}"
                f"{f' at revision {self.revision!r}' if self.revision else ''}"
                f"{where} "
                f"({type(e).__name__}: {str(e)[:300]}). "
                "Give a hub name that is downloaded (or downloadable: HF_HUB_OFFLINE and local_files_only unset, "
                "logged in or `token` set for gated models) or a local directory saved with save_pretrained, in the "
                "model's `pretrained`.") from e
        return prepare_pipeline(pipe)

    def attach(self, pipe, denoiser: nn.Module) -> nn.Module:
        """Register the denoiser (with its LoRA adapter and checkpointing) and the VAE as submodules; the text
        encoders are submodules only with ``keep_text_encoders_on_device``."""
        denoiser.requires_grad_(False).eval()
        if self.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        self._pipe = pipe
        if self.adapter:
            self.load_adapter(pipe, denoiser)
        if self.torch_dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
            # SDXL's VAE overflows in fp16 (its pipeline upcasts it the same way); .float(), not .to(float32),
            # which makes diffusers warn about modules to keep in float32 (there are none)
            pipe.vae.float()
        self.vae = pipe.vae  # submodules, so that .to(device) moves them with the denoiser
        self._text_encoders = [getattr(pipe, n) for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None]
        if self.keep_text_encoders_on_device and not self.cpu_offload:
            self.text_encoders = nn.ModuleList(self._text_encoders)
        if self.cpu_offload:
            self.enable_cpu_offload(pipe)
        return denoiser

    def enable_cpu_offload(self, pipe) -> None:
        """diffusers' ``enable_model_cpu_offload`` on the pipeline. Its hooks sit on the components' ``forward``,
        so they act on tsf's own calls of the denoiser and the VAE too: a component comes to the device when it
        is called, the one before it in the pipeline's ``model_cpu_offload_seq`` (text encoders, denoiser,
        VAE) goes back to the CPU. Moving the model to the device (Lightning does) brings the denoiser and the
        VAE along, and the hooks send them back as they go."""
        if self.cpu_offload is True:
            if not torch.cuda.is_available():
                raise ConfigError("cpu_offload: true offloads between the CPU and a GPU, and this machine has no "
                                  "CUDA GPU: set it false (or name the device that runs the components)")
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device(self.cpu_offload)
        pipe.enable_model_cpu_offload(device=device)
        self._offload_device = device if device.type != "cpu" else torch.device("cpu")

    @contextlib.contextmanager
    def _text_encoders_on_device(self):
        """The text encoders on the model's device while they encode, back on the CPU after (unless they stay
        there: ``keep_text_encoders_on_device``; under ``cpu_offload`` the offload hooks move them)."""
        device = self.device
        move = not self.keep_text_encoders_on_device and not self.cpu_offload and device.type != "cpu"
        if move:
            for part in self._text_encoders:
                part.to(device)
        try:
            yield
        finally:
            if move:
                for part in self._text_encoders:
                    part.to("cpu")

    # -- LoRA adapters ----------------------------------------------------------------------------
    def load_adapter(self, pipe, denoiser: nn.Module) -> None:
        """Load ``adapter``: diffusers' format through the pipeline's ``load_lora_weights`` (a directory or hub
        repo with ``pytorch_lora_weights.safetensors``, or a ``.safetensors`` file), or a peft adapter directory
        (``adapter_config.json`` and ``adapter_model.safetensors``) injected with ``add_adapter``."""
        path = Path(self.adapter)
        if (path / "adapter_config.json").is_file() and not (path / LORA_WEIGHTS).is_file():
            self._load_peft_adapter(path, denoiser)
        else:
            try:
                with _quiet_loading(warnings_too=True):
                    pipe.load_lora_weights(self.adapter)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise ConfigError(
                    f"cannot load the LoRA adapter {self.adapter!r} into {type(pipe).__name__} "
                    f"({type(e).__name__}: {str(e)[:300]}). `adapter` takes diffusers' LoRA format (a directory or "
                    f"hub repo with {LORA_WEIGHTS}, as tsf finetune and diffusers' training scripts save it, or a "
                    ".safetensors file) or a peft adapter directory (adapter_config.json)") from e
            if not any(pipe.get_list_adapters().values()):
                raise ConfigError(f"{self.adapter!r} holds no LoRA weights for any component of {type(pipe).__name__}")
        denoiser.requires_grad_(False)

    def _load_peft_adapter(self, path: Path, denoiser: nn.Module) -> None:
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = path / "adapter_model.safetensors"
        if weights.is_file():
            state = load_file(str(weights))
        elif (path / "adapter_model.bin").is_file():
            state = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
        else:
            raise ConfigError(f"the peft adapter {str(path)!r} has adapter_config.json but no adapter_model.safetensors")
        prefix = "base_model.model."  # a PeftModel's names of the wrapped model's modules
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
        denoiser.add_adapter(LoraConfig.from_pretrained(str(path)))
        result = set_peft_model_state_dict(denoiser, state)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise ConfigError(f"the peft adapter {str(path)!r} does not fit the {self.denoiser_name} of "
                              f"{self.pretrained!r}: {len(unexpected)} keys match no module, e.g. {unexpected[0]}")

    def add_lora(self, rank: int, alpha: Optional[float], target_modules: Sequence[str]) -> None:
        """LoRA adapters on the denoiser as diffusers' training scripts inject them: ``add_adapter`` with
        ``init_lora_weights="gaussian"`` (A Gaussian, B zero: the model starts unchanged); base weights frozen,
        the adapters in float32 whatever the base's dtype."""
        from peft import LoraConfig

        if self.adapter:
            raise ConfigError("fine-tuning trains fresh adapters on the base weights: unset the model's adapter")
        self.load()
        self.net.requires_grad_(False)
        self.net.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                        target_modules=list(target_modules)))
        if self.torch_dtype != torch.float32:
            # the trained LoRA weights in float32 over the float16/bfloat16 base, as diffusers' training scripts
            # keep them (cast_training_params): their updates in half precision overflow to NaN
            from diffusers.training_utils import cast_training_params

            cast_training_params(self.net, dtype=torch.float32)

    def save_lora(self, path: Union[str, Path]) -> None:
        """The denoiser's adapter in diffusers' format (``path/pytorch_lora_weights.safetensors``, its LoRA
        configuration in the file's metadata), as diffusers' training scripts save it: it loads with
        ``pipe.load_lora_weights(path)`` in diffusers and through ``adapter`` in tsf."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        name = self.denoiser_name
        layers = get_peft_model_state_dict(self.net)
        if self.lora_diffusers_keys:
            layers = convert_state_dict_to_diffusers(layers)
        config = self.net.peft_config["default"].to_dict()
        type(self._pipe).save_lora_weights(str(path), **{f"{name}_lora_layers": layers,
                                                        f"{name}_lora_adapter_metadata": config})

    # -- the kernel's helpers -----------------------------------------------------------------------
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
        idx = self.prompts.lookup(as_prompts(conditions), self._encode_on_device)
        return torch.tensor(idx, dtype=torch.long, device=self.device)

    def _encode_on_device(self, prompts: list[str]) -> dict[str, Tensor]:
        with self._text_encoders_on_device():
            return self.encode_prompts(prompts)

    def latents_to_images(self, z: Tensor) -> Tensor:
        """One VAE decode of a chunk of latents (already unscaled) to images in [0, 1]."""
        img = self.vae.decode(z.to(self.vae.dtype)).sample
        return ((img.float() + 1) / 2).clamp(0, 1)

    def decode(self, x0: Tensor) -> Tensor:
        if self.cpu_offload and torch.is_grad_enabled() and x0.requires_grad:
            raise ConfigError("cpu_offload sends the denoiser back to the CPU while the VAE decodes, so no gradient "
                              "can flow through the denoiser and the decoder (DAS, DPS, DRaFT): set cpu_offload false "
                              "(keep_text_encoders_on_device false already keeps the text encoders off the GPU)")
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
        quantized = f", quantization_config={self.loading['quantization_config']!r}" \
            if "quantization_config" in self.loading else ""
        return f"{type(self).__name__}({self.pretrained}, {self.extra_repr()}{quantized})"


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
        adapter: a LoRA adapter: diffusers' format (a directory or hub repo with
            ``pytorch_lora_weights.safetensors``, what ``tsf finetune`` and diffusers' training scripts save,
            or one ``.safetensors`` file), loaded by the pipeline's ``load_lora_weights``; or a peft adapter
            directory (``adapter_config.json``, older ``tsf finetune`` runs).
        variant: the weights' variant (``fp16``), as diffusers names it.
        revision: the hub revision (branch, tag or commit) of ``pretrained``.
        batch_invariant: pad calls on fewer than 16 rows to 16 rows, so that a sample is bitwise the same
            whatever batch or process draws it; off by default: it computes up to 16x the rows the method needs.
        keep_text_encoders_on_device: keep the text encoders on the model's device (by default they stay on
            the CPU and visit the device only while they encode new prompts).
        cpu_offload: diffusers' model CPU offload (``true``: onto the current CUDA device; or a device name):
            each component on the GPU only while it runs. For gradient-free sampling: no gradient flows
            through an offloaded denoiser and decoder, and fine-tuning refuses it.
        local_files_only, cache_dir, token, use_safetensors, device_map: passed to ``from_pretrained`` as
            diffusers takes them (the hub cache only; another cache directory; a hub token for gated models,
            ``true`` for the logged-in one (a token written out is saved with the run's config);
            safetensors files only; diffusers' placement of the components, e.g. ``balanced``).
        quantization_config: passed to ``from_pretrained``: diffusers' ``PipelineQuantizationConfig`` or one model's
            quantization config (``BitsAndBytesConfig``, ``TorchAoConfig``, ``GGUFQuantizationConfig``,
            ``QuantoConfig``; then it quantizes the denoiser); in a config file, ``PipelineQuantizationConfig``'s
            arguments (``{quant_backend: bitsandbytes_4bit, quant_kwargs: {load_in_4bit: true}}``; the components
            default to the denoiser) or ``{class_path: diffusers.TorchAoConfig, init_args: {quant_type: {class_path:
            torchao.quantization.Int8WeightOnlyConfig}}}`` (``class_path`` mappings at any depth are built).
    """

    pipeline_class = "DiffusionPipeline"

    def __init__(self, pretrained: str, num_steps: int = 50, eta: float = 1.0, guidance_scale: float = 7.5,
                 negative_prompt: Optional[str] = None, height: Optional[int] = None, width: Optional[int] = None,
                 scheduler: Literal["ddim", "ddpm"] = "ddim", dtype: str = "float32", decode_batch: int = 8,
                 gradient_checkpointing: bool = False, adapter: Optional[str] = None,
                 variant: Optional[str] = None, batch_invariant: bool = False, revision: Optional[str] = None,
                 keep_text_encoders_on_device: bool = False, cpu_offload: Union[bool, str] = False,
                 local_files_only: bool = False, cache_dir: Optional[str] = None, token: Union[bool, str, None] = None,
                 use_safetensors: Optional[bool] = None, device_map: Optional[str] = None,
                 quantization_config: Optional[dict[str, Any]] = None) -> None:
        EpsDiffusionModel.__init__(self, None, None, scheduler=scheduler, num_steps=num_steps, eta=eta,
                                   guidance_scale=guidance_scale, sample_shape=(4, 64, 64))
        self._init_pipeline(pretrained, dtype=dtype, decode_batch=decode_batch,
                            gradient_checkpointing=gradient_checkpointing, adapter=adapter, variant=variant,
                            revision=revision, height=height, width=width, negative_prompt=negative_prompt,
                            batch_invariant=batch_invariant, keep_text_encoders_on_device=keep_text_encoders_on_device,
                            cpu_offload=cpu_offload, local_files_only=local_files_only, cache_dir=cache_dir,
                            token=token, use_safetensors=use_safetensors, device_map=device_map,
                            quantization_config=quantization_config)

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
        if self.xl:  # SDXL's micro-conditioning: (original size, crop top-left, target size) = ((h, w), (0, 0), (h, w))
            proj = pipe.text_encoder_2.config.projection_dim
            expected = getattr(getattr(unet, "add_embedding", None), "linear_1", None)
            if expected is None or unet.config.addition_time_embed_dim * 6 + proj != expected.in_features:
                raise ConfigError(f"{self.pretrained}: the UNet's added time embedding does not take SDXL's six "
                                  "size and crop conditions (a refiner's aesthetic-score conditioning is not supported)")
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
            pooled = self.paired("pooled", c).to(self.torch_dtype)
            h, w = self.image_hw
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=emb.dtype, device=x.device)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.expand(len(c), -1)}
        return self._denoiser_call(lambda xs, ts, e: self.net(xs, ts, encoder_hidden_states=e, **kwargs).sample,
                                   x, t, emb)


TIME_GRIDS = ("scheduler", "uniform", "reference")


class _FlowPipeline(_Pipeline, FlowModel):
    """The flow families (SD3, FLUX): a velocity ``u_t`` on the linear path with ``t`` = sigma, sampled on the
    time grid of the pipeline's scheduler."""

    denoiser_name = "transformer"
    lora_diffusers_keys = False
    #: ``max_shift`` where the scheduler's config has none, as the pipeline's ``calculate_shift`` call defaults it
    default_max_shift = 1.15

    def __init__(self, pretrained: str, *, num_steps: int, interpolant: str, diffusion: str, diffusion_norm: float,
                 time_grid: Optional[str], shift: Optional[float], guidance_scale: float, last_step: Optional[str],
                 max_sequence_length: int, **pipeline) -> None:
        time_grid = time_grid or "scheduler"
        if time_grid not in TIME_GRIDS:
            raise ConfigError(f"unknown time_grid {time_grid!r}; known: {', '.join(TIME_GRIDS)}")
        if shift is not None and shift <= 0:
            raise ConfigError(f"shift must be > 0, got {shift}")
        FlowModel.__init__(self, None, num_steps=num_steps, interpolant=interpolant, diffusion=diffusion,
                           diffusion_norm=diffusion_norm, time_grid="uniform" if time_grid == "scheduler" else time_grid,
                           sample_shape=(16, 128, 128), shift=shift or 1.0, last_step=last_step)
        self.time_grid = time_grid  # the placeholder grid above is replaced by the scheduler's at load
        self._init_pipeline(pretrained, **pipeline)
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
        self.use_grid(*self.scheduler_grid(pipe))

    # -- the time grid: the pipeline's scheduler's ----------------------------------------------
    def pipeline_sigmas(self, scheduler) -> Optional[np.ndarray]:
        """The base sigmas the pipeline's ``__call__`` gives its scheduler (``None``: the scheduler's own spacing)."""
        return None

    def image_seq_len(self) -> int:
        """The transformer's number of image tokens (what dynamic shifting's ``mu`` is linear in)."""
        raise NotImplementedError

    def dynamic_shift_mu(self, config) -> float:
        """``mu`` of dynamic shifting, by the ``calculate_shift`` of the pipeline's own module from the image's
        token count, with the arguments the pipeline passes."""
        module = importlib.import_module(type(self._pipe).__module__)
        calculate_shift = getattr(module, "calculate_shift", None)
        if calculate_shift is None:
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        return float(calculate_shift(self.image_seq_len(), config.get("base_image_seq_len", 256),
                                     config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                     config.get("max_shift", self.default_max_shift)))

    def scheduler_grid(self, pipe) -> tuple[Tensor, Optional[float]]:
        """The time grid ``s_0 = 1 > ... > s_T = 0``: the ``sigmas`` of a fresh copy of the pipeline's scheduler
        (with ``shift`` in place of its shift and dynamic shifting when that is set) after ``set_timesteps`` as
        the pipeline calls it: ``num_inference_steps = T``, the base sigmas of ``time_grid`` (``scheduler``: the
        pipeline's own; ``uniform``: ``1 - k / T``; ``reference``: ``sqrt(1 - (k / T)^2)``) and, under dynamic
        shifting, ``mu``. The scheduler applies its shift, ``shift_terminal`` and sigma conversions. Returns the
        grid and the one shift that made it (``None`` when no single number says it)."""
        T = self.num_steps
        overrides = {} if self.shift_option is None else {"shift": self.shift_option, "use_dynamic_shifting": False}
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **overrides)
        cfg = scheduler.config
        k = np.arange(T) / T
        sigmas = {"scheduler": lambda: self.pipeline_sigmas(scheduler), "uniform": lambda: 1 - k,
                  "reference": lambda: np.sqrt(1 - k**2)}[self.time_grid]()
        accepts = inspect.signature(scheduler.set_timesteps).parameters
        kwargs: dict[str, Any] = {}
        shift: Optional[float] = float(cfg.get("shift", 1.0))
        if cfg.get("use_dynamic_shifting", False):
            if "mu" not in accepts:
                raise ConfigError(f"{type(scheduler).__name__} sets use_dynamic_shifting but its set_timesteps takes no mu")
            kwargs["mu"] = mu = self.dynamic_shift_mu(cfg)
            shift = math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else mu
        if cfg.get("shift_terminal") or any(cfg.get(f"use_{s}_sigmas") for s in ("karras", "exponential", "beta")):
            shift = None
        if sigmas is None:
            scheduler.set_timesteps(T, **kwargs)
        elif "sigmas" not in accepts:
            raise ConfigError(f"time_grid: {self.time_grid} hands the scheduler its sigmas, and "
                              f"{type(scheduler).__name__}.set_timesteps takes none: use time_grid: scheduler")
        else:
            scheduler.set_timesteps(sigmas=[float(v) for v in sigmas], **kwargs)
        grid = getattr(scheduler, "sigmas", None)
        if grid is None or len(grid) != T + 1:
            raise ConfigError(f"{type(scheduler).__name__} gives no grid of {T} steps (its sigmas: {grid}); tsf's flows "
                              "sample on a flow-matching scheduler's sigmas (FlowMatchEulerDiscreteScheduler)")
        return grid, shift


class StableDiffusion3(_FlowPipeline):
    """Stable Diffusion 3 / 3.5 (MMDiT rectified flow) as a :class:`~tsf.models.flow.FlowModel`.

    Args:
        pretrained: hub name (``stabilityai/stable-diffusion-3-medium-diffusers``) or a local directory.
        num_steps, interpolant, diffusion, diffusion_norm, last_step: the flow kernel
            (:class:`~tsf.models.flow.FlowModel`; ``diffusion: none`` is the ODE).
        time_grid: the base points handed to the scheduler's ``set_timesteps``, which shifts them:
            ``scheduler`` (default) what the pipeline itself samples on (SD3: the scheduler's own spacing),
            ``uniform`` ``1 - k / T``, ``reference`` ``sqrt(1 - (k / T)^2)``.
        shift: a time shift in place of the scheduler's (default: the scheduler's, 3.0 for SD3; with it
            the scheduler's dynamic shifting is off).
        guidance_scale: classifier-free guidance on the velocity (1: none).
        max_sequence_length: T5 tokens.
        (the rest as :class:`StableDiffusion`)
    """

    pipeline_class = "StableDiffusion3Pipeline"
    default_max_shift = 1.16  # the SD3 pipeline's calculate_shift default

    def __init__(self, pretrained: str, num_steps: int = 28, interpolant: Literal["linear", "vp"] = "linear",
                 diffusion: Literal["square", "linear", "constant", "none"] = "square", diffusion_norm: float = 3.0,
                 time_grid: Optional[Literal["scheduler", "uniform", "reference"]] = None,
                 shift: Optional[float] = None, guidance_scale: float = 7.0, negative_prompt: Optional[str] = None,
                 height: Optional[int] = None, width: Optional[int] = None, dtype: str = "float32",
                 decode_batch: int = 8, gradient_checkpointing: bool = False, adapter: Optional[str] = None,
                 variant: Optional[str] = None, max_sequence_length: int = 256, batch_invariant: bool = False,
                 last_step: Optional[Literal["tweedie", "euler"]] = None, revision: Optional[str] = None,
                 keep_text_encoders_on_device: bool = False, cpu_offload: Union[bool, str] = False,
                 local_files_only: bool = False, cache_dir: Optional[str] = None, token: Union[bool, str, None] = None,
                 use_safetensors: Optional[bool] = None, device_map: Optional[str] = None,
                 quantization_config: Optional[dict[str, Any]] = None) -> None:
        super().__init__(pretrained, num_steps=num_steps, interpolant=interpolant, diffusion=diffusion,
                         diffusion_norm=diffusion_norm, time_grid=time_grid, shift=shift,
                         guidance_scale=guidance_scale, last_step=last_step, max_sequence_length=max_sequence_length,
                         dtype=dtype, decode_batch=decode_batch, gradient_checkpointing=gradient_checkpointing,
                         adapter=adapter, variant=variant, revision=revision, height=height, width=width,
                         negative_prompt=negative_prompt, batch_invariant=batch_invariant,
                         keep_text_encoders_on_device=keep_text_encoders_on_device, cpu_offload=cpu_offload,
                         local_files_only=local_files_only, cache_dir=cache_dir, token=token,
                         use_safetensors=use_safetensors, device_map=device_map,
                         quantization_config=quantization_config)

    def image_seq_len(self) -> int:
        p = self.net.config.patch_size
        return (self.sample_shape[1] // p) * (self.sample_shape[2] // p)

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
        num_steps, interpolant, diffusion, diffusion_norm, last_step: the flow kernel.
        time_grid, shift: as :class:`StableDiffusion3` (``scheduler``: the pipeline's ``linspace(1, 1 / T, T)``,
            shifted by the scheduler: FLUX.1 [dev]'s dynamic shifting, ``mu`` from the image's token count).
        guidance_scale: FLUX.1 [dev]'s embedded guidance (ignored by models without it).
        max_sequence_length: T5 tokens (schnell: at most 256).
        (the rest as :class:`StableDiffusion`)
    """

    pipeline_class = "FluxPipeline"

    def __init__(self, pretrained: str, num_steps: int = 4, interpolant: Literal["linear", "vp"] = "linear",
                 diffusion: Literal["square", "linear", "constant", "none"] = "square", diffusion_norm: float = 3.0,
                 time_grid: Optional[Literal["scheduler", "uniform", "reference"]] = None,
                 shift: Optional[float] = None, guidance_scale: float = 3.5, height: Optional[int] = None,
                 width: Optional[int] = None, dtype: str = "float32", decode_batch: int = 8,
                 gradient_checkpointing: bool = False, adapter: Optional[str] = None, variant: Optional[str] = None,
                 max_sequence_length: int = 256, batch_invariant: bool = False,
                 last_step: Optional[Literal["tweedie", "euler"]] = None, revision: Optional[str] = None,
                 keep_text_encoders_on_device: bool = False, cpu_offload: Union[bool, str] = False,
                 local_files_only: bool = False, cache_dir: Optional[str] = None, token: Union[bool, str, None] = None,
                 use_safetensors: Optional[bool] = None, device_map: Optional[str] = None,
                 quantization_config: Optional[dict[str, Any]] = None) -> None:
        super().__init__(pretrained, num_steps=num_steps, interpolant=interpolant, diffusion=diffusion,
                         diffusion_norm=diffusion_norm, time_grid=time_grid, shift=shift,
                         guidance_scale=guidance_scale, last_step=last_step, max_sequence_length=max_sequence_length,
                         dtype=dtype, decode_batch=decode_batch, gradient_checkpointing=gradient_checkpointing,
                         adapter=adapter, variant=variant, revision=revision, height=height, width=width,
                         negative_prompt=None, batch_invariant=batch_invariant,
                         keep_text_encoders_on_device=keep_text_encoders_on_device, cpu_offload=cpu_offload,
                         local_files_only=local_files_only, cache_dir=cache_dir, token=token,
                         use_safetensors=use_safetensors, device_map=device_map,
                         quantization_config=quantization_config)

    def _load(self) -> None:
        super()._load()
        pipe = self._pipe
        _, lh, lw = self.sample_shape
        if lh % 2 or lw % 2:
            raise ConfigError(f"FLUX packs 2x2 latent patches: height and width must be multiples of "
                              f"{2 * pipe.vae_scale_factor}")

    def pipeline_sigmas(self, scheduler) -> Optional[np.ndarray]:
        if scheduler.config.get("use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1 / self.num_steps, self.num_steps)

    def image_seq_len(self) -> int:
        return (self.sample_shape[1] // 2) * (self.sample_shape[2] // 2)

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        emb, pooled, _ = self._pipe.encode_prompt(prompts, prompts, device=self.device, num_images_per_prompt=1,
                                                  max_sequence_length=self.max_sequence_length)
        return {"emb": emb, "pooled": pooled}

    def velocity(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        n, ch, lh, lw = x.shape
        packed = pack_latents(x)
        img_ids = latent_image_ids(lh // 2, lw // 2, x.device, self.torch_dtype)
        emb, pooled = self.prompts.get("emb", c), self.prompts.get("pooled", c)
        txt_ids = torch.zeros(emb.shape[1], 3, device=x.device, dtype=self.torch_dtype)
        guidance = None
        if getattr(self.net.config, "guidance_embeds", False):
            guidance = torch.full((n,), self.guidance_scale, device=x.device, dtype=torch.float32)

        def fn(xs, ts, e, p):
            return self.net(hidden_states=xs, timestep=ts, guidance=guidance, pooled_projections=p,
                            encoder_hidden_states=e, txt_ids=txt_ids, img_ids=img_ids).sample

        u = self._denoiser_call(fn, packed, t * 1000 / 1000, emb, pooled)  # the pipeline's rounding of t
        return unpack_latents(u, lh, lw)
