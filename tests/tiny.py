"""Tiny tokenizers built offline, for tiny random diffusers/transformers components in tests.

Nothing here downloads: the CLIP tokenizer is the real ``CLIPTokenizer`` class on a byte-level
vocabulary with no merges; the T5 tokenizer is a ``T5TokenizerFast`` on a unigram
vocabulary of letters and a few words. Both save with ``save_pretrained`` and load back with ``from_pretrained``
the way a hub checkpoint's tokenizer folder does.
"""

from __future__ import annotations

from pathlib import Path

from tsf.commands import bench_gpu

VOCAB_SIZE = 1000  # the tiny text encoders' vocabulary (>= every id the tokenizers produce)


def clip_tokenizer(path: Path, model_max_length: int = 16):
    """A CLIPTokenizer (byte-level vocabulary, ids < 514) saved to ``path`` and loaded back (the bench's, shorter)."""
    return bench_gpu.clip_tokenizer(path, model_max_length)


def t5_tokenizer(path: Path, model_max_length: int = 16):
    """A T5 tokenizer (unigram over letters and a few words) saved to ``path`` and loaded back (the bench's, shorter)."""
    return bench_gpu.t5_tokenizer(path, model_max_length)


def clip_model_dir(path: Path, image_size: int = 32, projection_dim: int = 16, seed: int = 0) -> Path:
    """A tiny random ``CLIPModel`` (2 layers, hidden 32) saved to ``path`` with the tiny CLIP tokenizer and
    a ``CLIPImageProcessor`` config (shortest edge and crop ``image_size``, bicubic, CLIP mean/std):
    the folder layout of a hub CLIP checkpoint such as ``openai/clip-vit-large-patch14``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = Path(path)
    tok = clip_tokenizer(path)
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    cfg = CLIPConfig(text_config=dict(common, vocab_size=VOCAB_SIZE, max_position_embeddings=tok.model_max_length,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id),
                     vision_config=dict(common, image_size=image_size, patch_size=8), projection_dim=projection_dim)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(str(path))
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(str(path))
    return path


# -- tiny random diffusers pipelines, built from config and saved like a hub checkpoint ----------------
def _clip_text(projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, projection_dim=hidden,
                         bos_token_id=512, eos_token_id=513, pad_token_id=513)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=VOCAB_SIZE, d_model=d_model, d_ff=37, d_kv=8, num_layers=2,
                                   num_heads=4, decoder_start_token_id=0)).eval()


def _vae(latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, norm_num_groups=8,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=latent_channels, sample_size=16, **kw)


def tiny_pipeline(kind: str, path: Path, seed: int = 0) -> Path:
    """Build a tiny random ``sd15`` / ``sd2v`` (v prediction) / ``sdxl`` / ``sd3`` / ``flux`` pipeline (16 px
    images, 8 px latents), save it to ``path``, return ``path``."""
    import torch
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                           FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                           StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)

    torch.manual_seed(seed)
    path = Path(path)
    if kind in ("sd15", "sd2v"):  # sd2v: the SD 2.x 768 layout, a v-prediction UNet
        unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                    out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    norm_num_groups=8, attention_head_dim=4)
        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if kind == "sd2v" else "epsilon")
        pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_clip_text(), tokenizer=clip_tokenizer(path / "_tok"),
                                       unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif kind == "sdxl":
        unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                    norm_num_groups=8, attention_head_dim=(2, 4), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80)
        sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
        tok = clip_tokenizer(path / "_tok")
        pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_clip_text(), text_encoder_2=_clip_text(True),
                                         tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched)
    elif kind == "sd3":
        net = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                    pooled_projection_dim=64, out_channels=4)
        tok = clip_tokenizer(path / "_tok")
        pipe = StableDiffusion3Pipeline(
            transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(shift_factor=0.0609),
            text_encoder=_clip_text(True), tokenizer=tok, text_encoder_2=_clip_text(True), tokenizer_2=tok,
            text_encoder_3=_t5(), tokenizer_3=t5_tokenizer(path / "_tok5"))
    elif kind == "flux":
        net = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        pipe = FluxPipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1, shift_factor=0.1),
                            text_encoder=_clip_text(), tokenizer=clip_tokenizer(path / "_tok"), text_encoder_2=_t5(),
                            tokenizer_2=t5_tokenizer(path / "_tok5"))
    else:
        raise ValueError(kind)
    pipe.save_pretrained(str(path))
    return path
