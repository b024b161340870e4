"""Real-model code on tiny random diffusers pipelines (SD 1.x, SDXL, SD3, FLUX) built from config,
saved to a temp directory and loaded through the same ``pretrained`` path a user gives."""

import contextlib
import io
from pathlib import Path

import diffusers
import pytest
import torch

from tiny import tiny_pipeline
from tsf.commands.bench import WorkCounter
from tsf.errors import ConfigError
from tsf.models import Flux, StableDiffusion, StableDiffusion3
from tsf.rewards import build_reward
from tsf.samplers import SMC, SVDD, BestOfN
from tsf.samplers.base import BaseSampler, Noise

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a dog"]
FAMILIES = {"sd15": StableDiffusion, "sd2v": StableDiffusion, "sdxl": StableDiffusion, "sd3": StableDiffusion3,
            "flux": Flux}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: tiny_pipeline(kind, root / kind) for kind in FAMILIES}


def model(pipelines, kind, **kw):
    extra = {"height": 16, "width": 16} if kind == "flux" else {}
    return FAMILIES[kind](pretrained=str(pipelines[kind]), num_steps=4, **{**extra, **kw})


def diffusers_images(pipelines, kind, m, noise, guidance, pipe=None):
    """The same prompts and initial latents through the diffusers pipeline itself (``m``'s own, or ``pipe``)."""
    pipe = m._pipe if pipe is None else pipe
    T = m.num_steps
    kw = dict(prompt=PROMPTS, num_inference_steps=T, guidance_scale=guidance, output_type="pt")
    if kind in ("sd15", "sd2v", "sdxl"):  # tsf's kernel is DDIM's whatever scheduler the checkpoint names
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        kw.update(latents=noise, eta=0.0)
    else:  # the flows: the pipeline's own time grid (tsf's default time_grid: scheduler)
        if kind == "flux":
            n, ch, h, w = noise.shape
            kw.update(latents=pipe._pack_latents(noise, n, ch, h, w), height=16, width=16,
                      max_sequence_length=m.max_sequence_length)
        else:
            kw.update(latents=noise)
    with torch.no_grad():
        return pipe(**kw).images


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_deterministic_sampling_equals_the_diffusers_pipeline(pipelines, kind):
    # DDIM with eta = 0 and the flows' ODE are the pipelines' own samplers: the same images
    guidance = 1.0 if kind == "flux" else 5.0
    m = model(pipelines, kind, **({"eta": 0.0} if kind in ("sd15", "sd2v", "sdxl") else {"diffusion": "none"}),
              guidance_scale=guidance)
    out = BaseSampler().sample(m, None, PROMPTS, range(2), seed=3)
    noise = Noise(3, range(2), m.device).randn(1, m.sample_shape)  # the prior draw of each sample id
    ref = diffusers_images(pipelines, kind, m, noise, guidance)
    assert out.images.shape == ref.shape
    torch.testing.assert_close(out.images, ref.float(), atol=2e-4, rtol=0)
    assert out.compute["nfe"] == 4 * 2  # one (guided) evaluation per step and sample


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_cfg_batch_of_prompts_equals_each_prompt_alone(pipelines, kind):
    m = model(pipelines, kind, guidance_scale=4.0)
    reward = build_reward("brightness")
    both = BestOfN(num_particles=2).sample(m, reward, PROMPTS, [5, 9])
    for j, (prompt, sid) in enumerate(zip(PROMPTS, [5, 9])):
        alone = BestOfN(num_particles=2).sample(m, reward, [prompt], [sid])
        torch.testing.assert_close(both.x0[j:j + 1], alone.x0, atol=1e-5, rtol=1e-5)
    # and the prompts matter: the two samples of the same noise differ with the prompt
    swapped = BestOfN(num_particles=2).sample(m, reward, PROMPTS[::-1], [5, 9])
    assert not torch.allclose(swapped.x0, both.x0, atol=1e-3)


# (sampler, UNet rows per output, VAE rows per output) at T steps with guidance (2 rows per evaluation); the
# selecting samplers hand back the images of the candidates they chose, so nothing is decoded twice
METHOD_ROWS = {
    "base": (lambda: BaseSampler(), lambda T: 2 * T, lambda T: 1),
    "best_of_n": (lambda: BestOfN(num_particles=3), lambda T: 2 * 3 * T, lambda T: 3),
    "svdd_pm": (lambda: SVDD(num_particles=3), lambda T: 2 * (1 + 3 * (T - 1)), lambda T: 3 * T),
    "das": (lambda: SMC(num_particles=3, proposal="gradient", tempering="fraction", grad_batch=1),
            lambda T: 2 * 3 * T, lambda T: 3 * (T + 1)),
}


@pytest.mark.parametrize("method", list(METHOD_ROWS))
def test_a_real_pipeline_computes_only_the_rows_the_method_needs(pipelines, method):
    """A hook on the UNet's forward: exactly the method's rows (no padding), and tsf's row counters agree;
    with batch_invariant the calls are padded, the counted NFE unchanged."""
    make, unet_rows, vae_rows = METHOD_ROWS[method]
    reward = build_reward("brightness")
    for invariant in (False, True):
        m = model(pipelines, "sd15", guidance_scale=4.0, batch_invariant=invariant).load()
        T = m.num_steps
        with WorkCounter(m._pipe.unet, m.vae) as counter:
            out = make().sample(m, reward, PROMPTS, range(2), seed=1)
        rows, decoded, n = counter.counts["unet_rows"], counter.counts["decode_rows"], len(PROMPTS)
        if not invariant:
            assert rows == n * unet_rows(T) and decoded == n * vae_rows(T), (rows, decoded)
            exact = out.compute
        assert out.compute["model_rows"] == rows and out.compute["decode_rows"] == decoded
        assert out.compute["nfe"] == n * unet_rows(T) / 2 == exact["nfe"]  # padding is never NFE
        again = m.decode(out.x0)  # the images handed back are the outputs' own
        torch.testing.assert_close(out.images, again, atol=1e-5, rtol=0)
    assert rows > exact["model_rows"]  # batch_invariant pads the calls on fewer than 16 rows


def test_das_through_the_tweedie_estimate_takes_no_backward_through_the_unet(pipelines):
    """DAS with gradient_through: tweedie on the tiny SD 1.x pipeline: the UNet computes network DAS's rows, none
    with a graph (a hook on the UNet), while the VAE and the reward are differentiated at every noisy step;
    tsf's nfe_grad is 0 and its reward_grad_calls those of network DAS (K per noisy step and output)."""
    reward = build_reward("brightness")
    m = model(pipelines, "sd15", guidance_scale=4.0).load()
    T, K, n = m.num_steps, 3, len(PROMPTS)
    noisy = sum(float(m.step_std(i)) > 0 for i in range(T))  # (this checkpoint's last step has noise too)
    counts = {}
    for through in ("network", "tweedie"):
        das = SMC(num_particles=K, proposal="gradient", tempering="fraction", gradient_through=through, grad_batch=2)
        with WorkCounter(m._pipe.unet, m.vae, reward) as counter:
            out = das.sample(m, reward, PROMPTS, range(2), seed=1)
        counts[through] = (counter.counts, out.compute)
    (net, net_c), (tw, tw_c) = counts["network"], counts["tweedie"]
    assert tw["unet_rows"] == net["unet_rows"] == n * 2 * K * T
    assert net["unet_grad_rows"] == n * 2 * K * noisy and tw["unet_grad_rows"] == 0
    assert tw["reward_grad_rows"] == net["reward_grad_rows"] == n * K * noisy
    assert tw["decode_rows"] == net["decode_rows"] == n * K * (T + 1)
    assert tw_c["nfe_grad"] == 0 and net_c["nfe_grad"] == n * K * noisy
    assert tw_c["reward_grad_calls"] == net_c["reward_grad_calls"] == n * K * noisy
    assert torch.isfinite(out.images).all()


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_batch_invariant_pipelines_give_the_same_bits_whatever_the_batch(pipelines, kind):
    m = model(pipelines, kind, guidance_scale=4.0, batch_invariant=True)
    both = SVDD(num_particles=2).sample(m, build_reward("brightness"), PROMPTS, [5, 9])
    for j, (prompt, sid) in enumerate(zip(PROMPTS, [5, 9])):
        alone = SVDD(num_particles=2).sample(m, build_reward("brightness"), [prompt], [sid])
        assert torch.equal(both.x0[j:j + 1], alone.x0)


def test_prompts_are_encoded_once(pipelines):
    m = model(pipelines, "sd15").load()
    calls = []
    encode = m._pipe.encode_prompt
    m._pipe.encode_prompt = lambda prompts, *a, **k: (calls.append(list(prompts)), encode(prompts, *a, **k))[1]
    c1 = m.encode_conditions(["a cat", "a dog", "a cat"])
    c2 = m.encode_conditions(["a dog", "a bird"])
    assert calls == [["a cat", "a dog"], ["a bird"]]  # each distinct prompt once, whatever its particles
    assert c1.tolist() == [0, 1, 0] and c2.tolist() == [1, 2]


# -- the shipped real-model configs, end to end through the CLI on tiny components --------------------
REAL_CONFIGS = {"sd15/best_of_n": "sd15", "sd15/svdd_pm": "sd15", "sd15/das": "sd15", "sd15/das_tweedie": "sd15",
                "flux/das_tweedie": "flux", "sdxl/das": "sdxl",
                "sd3/rbf": "sd3", "sd3/best_of_n": "sd3", "flux/rbf": "flux", "flux/best_of_n": "flux",
                # the RBF paper's baselines
                **{f"{family}/{method}": family for family in ("sd3", "flux") for method in ("sop", "smc", "code", "svdd")}}
SMALL_SAMPLERS = {"BestOfN": ["num_particles=2"], "SVDD": ["num_particles=2"], "SMC": ["num_particles=2"],
                  "RBF": ["budget=12", "n0=2", "proposal_batch=2"], "SoP": ["num_particles=2"],
                  "CoDe": ["num_particles=2"]}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tiny import clip_model_dir
    from tsf.rewards.clip import AestheticHead

    path = clip_model_dir(tmp_path_factory.mktemp("clip") / "clip")
    torch.manual_seed(0)
    torch.save(AestheticHead(16).state_dict(), path / "head.pth")
    return path


FAST = {"sd15/das", "flux/rbf"}  # DAS through UNet + VAE + CLIP, RBF on a flow; the rest with -m slow


@pytest.mark.parametrize("config", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in REAL_CONFIGS])
def test_real_model_config_writes_a_complete_run_directory(pipelines, tiny_clip, tmp_path, config):
    import json

    import yaml

    from tsf.cli import load_samples, main

    path = ROOT / "configs" / f"{config}.yaml"
    init = yaml.safe_load(path.read_text())["model"]["init_args"]
    sampler = init["sampler"]["class_path"].rsplit(".", 1)[1]
    reward_is_class = isinstance(init["reward"], dict)
    assert reward_is_class or init["reward"] == "pickscore"
    base = "--model.init_args.base.init_args"
    main(["sample", "--config", str(path), f"{base}.pretrained={pipelines[REAL_CONFIGS[config]]}",
          f"{base}.num_steps=3", f"{base}.height=16", f"{base}.width=16", f"{base}.dtype=float32", f"{base}.variant=",
          # the config's reward class on the tiny CLIP (a registered name becomes its class)
          f"--model.init_args.reward.init_args.model={tiny_clip}" if reward_is_class else
          f"--model.init_args.reward={{class_path: tsf.rewards.PickScore, init_args: {{model: {tiny_clip}, "
          f"processor: {tiny_clip}}}}}",
          *([f"--model.init_args.reward.init_args.head={tiny_clip / 'head.pth'}"] if reward_is_class else []),
          f"--model.init_args.cross_rewards=[{{class_path: tsf.rewards.ClipScore, init_args: {{model: {tiny_clip}}}}}]",
          *[f"--model.init_args.sampler.init_args.{a}" for a in SMALL_SAMPLERS[sampler]],
          "--data.init_args.num_samples=3", "--data.init_args.batch_size=2", "--trainer.accelerator=cpu",
          f"--output_dir={tmp_path}", "--run_name=run", "--wandb_mode=disabled", "--trainer.enable_progress_bar=false"])
    run = tmp_path / "run"
    for f in ("config.yaml", "metrics.json", "samples.pt", "grid.png"):
        assert (run / f).is_file(), f
    m = json.loads((run / "metrics.json").read_text())
    assert m["compute/nfe"] > 0 and "cross/clip_score/mean" in m and "diversity/vendi" in m
    sampler_args = init["sampler"].get("init_args", {})
    if sampler_args.get("proposal") == "gradient":
        assert m["compute/reward_grad_calls"] > 0  # DAS: gradients through the VAE and the CLIP reward ...
        if sampler_args.get("gradient_through") == "tweedie":
            assert m["compute/nfe_grad"] == 0  # ... and not through the denoiser
        else:
            assert m["compute/nfe_grad"] > 0  # ... and the denoiser
    s = load_samples(run)
    assert s["images"].shape == (3, 3, 16, 16) and s["sample_id"].tolist() == [0, 1, 2]


def test_lora_adapters_train_in_float32_on_a_float16_pipeline(pipelines):
    """On a pipeline in the configs' ``dtype: float16``, the LoRA weights that train are float32 (as diffusers'
    training scripts keep them): a half-precision update overflowed to NaN and every validation metric with it."""
    m = model(pipelines, "sd15", dtype="float16")
    m.add_lora(4, None, ["to_q", "to_k", "to_v", "to_out.0"])
    trained = [p for p in m.net.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(p.dtype == torch.float16 for p in m.net.parameters() if not p.requires_grad)
    b = BaseSampler().sample(m, None, ["a cat", "a dog"], range(2))
    assert torch.isfinite(b.images).all()


@pytest.mark.slow  # about a minute on CPU
def test_draft_in_the_configs_float16_gets_through_its_first_validation(pipelines, tiny_clip, tmp_path):
    """``configs/sd15/draft.yaml`` as shipped (``dtype: float16``), on CPU: two steps, then a validation whose
    metrics are finite (it ended in NaN samples and ``linalg.eigh`` failing in Vendi)."""
    import json

    from tsf.cli import main

    base = "--model.init_args.base.init_args"
    main(["finetune", "--config", str(ROOT / "configs/sd15/draft.yaml"), f"{base}.pretrained={pipelines['sd15']}",
          f"{base}.num_steps=3", f"{base}.height=16", f"{base}.width=16",
          f"--model.init_args.reward.init_args.model={tiny_clip}",
          f"--model.init_args.reward.init_args.head={tiny_clip / 'head.pth'}",
          f"--model.init_args.cross_rewards=[{{class_path: tsf.rewards.ClipScore, init_args: {{model: {tiny_clip}}}}}]",
          "--model.init_args.batch_size=2", "--model.init_args.val_samples=4", "--trainer.max_steps=2",
          "--trainer.val_check_interval=2", "--trainer.accelerator=cpu", "--trainer.logger=false",
          "--trainer.enable_progress_bar=false", f"--output_dir={tmp_path}", "--run_name=run", "--wandb_mode=disabled"])
    (line,) = (tmp_path / "run" / "val_metrics.jsonl").read_text().splitlines()
    metrics = json.loads(line)
    assert metrics["step"] == 2 and metrics["target/nonfinite"] == 0
    assert all(v == v and abs(v) < float("inf") for v in metrics.values()), metrics  # no NaN, no inf


@pytest.mark.parametrize("method, family", [("draft", "sd15"), ("ddpo", "sd15"), ("draft", "sdxl"),
                                            pytest.param("ddpo", "sdxl", marks=pytest.mark.slow)])  # (about 40 s)
def test_finetuning_baselines_train_lora_on_a_real_model_config(pipelines, tiny_clip, tmp_path, method, family):
    """``tsf finetune`` on a Stable Diffusion 1.x and an SDXL pipeline (``configs/<family>/<method>.yaml``; SDXL's
    kernel gives the UNet its pooled text embeddings and time ids): the adapter is diffusers' LoRA format, a plain
    ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` loads it with ``load_lora_weights`` and its output
    changes, and tsf's ``adapter`` gives the same samples as that pipeline; the checkpoint holds the adapters alone."""
    from safetensors.torch import load_file

    from tsf.cli import main

    base = "--model.init_args.base.init_args"
    main(["finetune", "--config", str(ROOT / f"configs/{family}/{method}.yaml"),
          f"{base}.pretrained={pipelines[family]}", f"{base}.variant=",
          f"{base}.num_steps=3", f"{base}.height=16", f"{base}.width=16", f"{base}.dtype=float32",
          f"--model.init_args.reward.init_args.model={tiny_clip}",
          f"--model.init_args.reward.init_args.head={tiny_clip / 'head.pth'}",
          f"--model.init_args.cross_rewards=[{{class_path: tsf.rewards.ClipScore, init_args: {{model: {tiny_clip}}}}}]",
          "--model.init_args.batch_size=2", "--model.init_args.val_samples=2", "--trainer.max_steps=2",
          "--model.init_args.lr=0.01",  # (so that 2 steps move the adapter well clear of zero)
          "--trainer.val_check_interval=2", "--trainer.accelerator=cpu", "--trainer.logger=false",
          "--trainer.enable_progress_bar=false", f"--output_dir={tmp_path}", "--run_name=run",
          *(["--model.init_args.micro_batch=1", "--model.init_args.num_batches_per_epoch=1",
             "--model.init_args.train_batch_size=2"] if method == "ddpo" else [])])
    run = tmp_path / "run"
    lora = load_file(str(run / "adapter" / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("unet.") and "lora" in k for k in lora)  # diffusers' names
    assert any("lora.up" in k and v.abs().max() > 0 for k, v in lora.items())  # B (up) starts at zero: it trained
    assert (run / "val_metrics.jsonl").read_text().count("target/mean") == 1
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])  # no UNet, VAE or CLIP weights
    assert len(ckpt["state_dict"]) == len(lora) == len(ckpt["optimizer_states"][0]["state"])  # one per LoRA matrix

    # the adapter in diffusers alone: it loads as an adapter of the UNet and changes the pipeline's output
    plain = plain_pipeline(pipelines, family)
    m = model(pipelines, family, eta=0.0, guidance_scale=5.0)
    noise = Noise(3, range(2), m.device).randn(1, (4, 8, 8))
    without = diffusers_images(pipelines, family, m.load(), noise, 5.0, pipe=plain)
    plain.load_lora_weights(str(run / "adapter"))
    assert plain.get_list_adapters() == {"unet": ["default_0"]}
    with_lora = diffusers_images(pipelines, family, m, noise, 5.0, pipe=plain)
    assert (with_lora - without).abs().max() > 1e-2
    # and through tsf's `adapter`: the samples of the pipeline with the LoRA
    tuned = model(pipelines, family, eta=0.0, guidance_scale=5.0, adapter=str(run / "adapter"))
    out = BaseSampler().sample(tuned, None, PROMPTS, range(2), seed=3)
    torch.testing.assert_close(out.images, with_lora.float(), atol=2e-4, rtol=0)


# -- LoRA adapters in diffusers' format, both ways, on every family -------------------------------------------
PIPELINE_CLASSES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
DENOISER = {"sd15": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}


def plain_pipeline(pipelines, kind, lora=None):
    """The tiny pipeline loaded by diffusers alone, with a LoRA through its own ``load_lora_weights``."""
    pipe = getattr(diffusers, PIPELINE_CLASSES[kind]).from_pretrained(str(pipelines[kind]))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def randomise_lora_b(net, seed=0):
    """LoRA's B starts at zero (the adapter a no-op): random values stand for a trained adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def deterministic(pipelines, kind, **kw):
    """The pipeline's own deterministic sampler (DDIM eta 0, the flow ODE), as the equality test above runs it."""
    guidance = 1.0 if kind == "flux" else 5.0
    return model(pipelines, kind, guidance_scale=guidance,
                 **({"eta": 0.0} if kind in ("sd15", "sdxl") else {"diffusion": "none"}), **kw), guidance


@pytest.mark.parametrize("kind", list(PIPELINE_CLASSES))
def test_a_lora_saved_by_diffusers_loads_in_tsf(pipelines, tmp_path, kind):
    """A LoRA made as diffusers' training scripts make one (``add_adapter``, Gaussian init; B random here as if
    trained) and saved by the pipeline class's ``save_lora_weights``: tsf's ``adapter`` loads it, and its samples
    are the pipeline's with that LoRA."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = plain_pipeline(pipelines, kind)
    net = getattr(pipe, DENOISER[kind])
    net.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                               target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    randomise_lora_b(net)
    layers = get_peft_model_state_dict(net)
    if DENOISER[kind] == "unet":  # the UNet scripts rename the keys, the SD3 and FLUX ones do not
        layers = convert_state_dict_to_diffusers(layers)
    type(pipe).save_lora_weights(str(tmp_path / "lora"), **{f"{DENOISER[kind]}_lora_layers": layers})

    m, guidance = deterministic(pipelines, kind, adapter=str(tmp_path / "lora"))
    out = BaseSampler().sample(m, None, PROMPTS, range(2), seed=3)
    noise = Noise(3, range(2), m.device).randn(1, m.sample_shape)
    ref = diffusers_images(pipelines, kind, m, noise, guidance, pipe=plain_pipeline(pipelines, kind, tmp_path / "lora"))
    torch.testing.assert_close(out.images, ref.float(), atol=2e-4, rtol=0)
    base = BaseSampler().sample(deterministic(pipelines, kind)[0], None, PROMPTS, range(2), seed=3)
    assert (out.images - base.images).abs().max() > 1e-2  # the adapter is in use


@pytest.mark.parametrize("kind", list(PIPELINE_CLASSES))
def test_an_adapter_saved_by_tsf_loads_in_diffusers(pipelines, tmp_path, kind):
    """The baselines' LoRA (``add_lora``: injected as diffusers' scripts do, seeded) saved by ``save_lora``: one
    ``pytorch_lora_weights.safetensors`` that a plain pipeline's ``load_lora_weights`` takes as an adapter of its
    denoiser, sampling as tsf's model with that adapter does."""
    from baselines.common import add_lora, save_lora

    m, guidance = deterministic(pipelines, kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_lora(m, rank=4)
    trainable = [n for n, p in m.net.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert m.net.peft_config["default"].init_lora_weights == "gaussian"  # diffusers' scripts' init
    again = deterministic(pipelines, kind)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_lora(again, rank=4)
    first = dict(m.net.named_parameters())
    assert all(torch.equal(p, first[n]) for n, p in again.net.named_parameters() if "lora_A" in n)  # seeded
    randomise_lora_b(m.net)
    save_lora(m, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["pytorch_lora_weights.safetensors"]
    pipe = plain_pipeline(pipelines, kind, tmp_path / "adapter")
    assert pipe.get_list_adapters() == {DENOISER[kind]: ["default_0"]}
    out = BaseSampler().sample(m, None, PROMPTS, range(2), seed=3)
    ref = diffusers_images(pipelines, kind, m, Noise(3, range(2), m.device).randn(1, m.sample_shape), guidance, pipe=pipe)
    torch.testing.assert_close(out.images, ref.float(), atol=2e-4, rtol=0)


def sd3_transformer(num_layers):
    """The tiny pipeline's SD3 transformer with ``num_layers`` blocks (its last block has no context output)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=num_layers,
                                 attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                 joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_the_lora_targets_of_the_flow_transformers_all_match_their_modules(pipelines, kind):
    """Every default LoRA target of SD3's and FLUX's transformers (diffusers' SD3 and FLUX LoRA training scripts'
    lists) names modules of the transformer, and peft puts an adapter on each of them and nowhere else. SD3 with
    2 blocks: the tiny pipeline's single block is a last block, which has no ``to_add_out`` (a real SD3 has it on
    every block but the last)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    from baselines.common import LORA_TARGETS

    net = sd3_transformer(2) if kind == "sd3" else plain_pipeline(pipelines, kind).transformer
    targets = LORA_TARGETS[type(net).__name__]
    matched = {t: [n for n, _ in net.named_modules() if n == t or n.endswith("." + t)] for t in targets}
    assert all(matched.values()), [t for t, names in matched.items() if not names]
    net.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=targets))
    adapted = {n for n, m in net.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == {n for names in matched.values() for n in names}
    if kind == "flux":  # the single-stream blocks' attention too, and both streams' feed-forward layers
        assert any(n.startswith("single_transformer_blocks.") for n in adapted)
        assert any(".ff_context." in n for n in adapted) and any(".ff." in n for n in adapted)
    else:
        assert any(n.endswith("attn.to_add_out") for n in adapted) and not any(".ff" in n for n in adapted)


@pytest.mark.parametrize("method", ["draft", pytest.param("grpo", marks=pytest.mark.slow)])  # (about 20 s each)
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_pipelines_finetune_lora_and_their_adapter_loads_into_the_flow_samplers(pipelines, tmp_path, kind,
                                                                                   method):
    """DRaFT and GRPO (DDPO with group advantages and the KL penalty) on a tiny SD3 / FLUX pipeline with the
    default LoRA targets: two optimiser steps move the adapters; the saved adapter (diffusers' format) loads
    back through the model's ``adapter``, samples as the trained model does, and changes what the flow
    samplers (SVDD, RBF) draw."""
    import lightning as L
    from safetensors.torch import load_file

    from baselines import DDPO, DRaFT
    from baselines.common import adapters_disabled
    from tsf.samplers import RBF

    reward = build_reward("brightness")
    common = dict(reward=reward, cross_rewards=[], conditions=PROMPTS, val_samples=2, lr=0.01, seed=0)
    m = model(pipelines, kind)
    module = (DRaFT(m, batch_size=2, **common) if method == "draft" else
              DDPO(m, batch_size=4, advantages="grpo", kl_coef=0.04, **common))
    trainer = L.Trainer(max_steps=2, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
                        accelerator="cpu")
    trainer.fit(module)
    lora = load_file(str(tmp_path / "adapter" / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") and ".lora_" in k for k in lora)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in lora.items())  # B starts at zero: it trained
    tuned = model(pipelines, kind, adapter=str(tmp_path / "adapter"))
    a = BaseSampler().sample(tuned, None, PROMPTS, range(2), seed=3)
    b = BaseSampler().sample(m, None, PROMPTS, range(2), seed=3)
    torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=0)
    for sampler in (SVDD(num_particles=2), RBF(num_particles=2, budget=2 * (2 + 4), n0=2)):
        x = sampler.sample(tuned, reward, PROMPTS, range(2), seed=3).x0
        with adapters_disabled(m):  # the base model
            y = sampler.sample(m, reward, PROMPTS, range(2), seed=3).x0
        assert (x - y).abs().max() > 1e-3, type(sampler).__name__


def test_a_peft_adapter_directory_of_an_older_run_still_loads(pipelines, tmp_path):
    """What ``tsf finetune`` wrote before (a peft ``PeftModel``'s ``save_pretrained``): the same denoiser as peft's."""
    from peft import LoraConfig, PeftModel, get_peft_model

    unet = plain_pipeline(pipelines, "sd15").unet
    peft = get_peft_model(unet, LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    randomise_lora_b(peft)
    peft.save_pretrained(str(tmp_path / "peft"))
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    m = model(pipelines, "sd15", adapter=str(tmp_path / "peft")).load()
    ref = PeftModel.from_pretrained(plain_pipeline(pipelines, "sd15").unet, str(tmp_path / "peft"))
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    t = torch.tensor([500, 20])
    with torch.no_grad():
        ours, theirs = m.net(x, t, encoder_hidden_states=e).sample, ref(x, t, encoder_hidden_states=e).sample
        plain = plain_pipeline(pipelines, "sd15").unet(x, t, encoder_hidden_states=e).sample
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert (ours - plain).abs().max() > 1e-3  # (lora_alpha 8 on rank 4: the scale 2 is peft's config's)


def test_adapter_errors_say_what_adapter_takes(pipelines, tmp_path):
    from baselines.common import add_lora, save_lora
    from tsf.errors import ConfigError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="takes diffusers' LoRA format"):
        model(pipelines, "sd15", adapter=str(tmp_path / "empty")).load()
    sd3 = model(pipelines, "sd3")
    add_lora(sd3, rank=2)
    save_lora(sd3, tmp_path / "sd3_lora")
    with pytest.raises(ConfigError, match="no LoRA weights for any component"):  # an SD3 LoRA on an SD 1.5 UNet
        model(pipelines, "sd15", adapter=str(tmp_path / "sd3_lora")).load()


# -- the flows' time grid is their pipeline's scheduler's -------------------------------------------------------
SCHEDULER_VARIANTS = {"default": {}, "shift_terminal": {"shift_terminal": 0.1},
                      "dynamic_shifting": {"use_dynamic_shifting": True, "base_image_seq_len": 1, "max_image_seq_len": 64},
                      "dynamic_and_terminal": {"use_dynamic_shifting": True, "shift_terminal": 0.05}}


def with_scheduler(pipelines, kind, tmp_path, **changes):
    """A copy of the tiny pipeline whose scheduler config has ``changes``."""
    import json
    import shutil

    if not changes:
        return pipelines[kind]
    path = tmp_path / kind
    shutil.copytree(pipelines[kind], path)
    cfg_file = path / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **changes}))
    return path


def pipeline_grid(path, kind, T, **call):
    """The sigmas the diffusers pipeline itself samples on (its scheduler's after a call)."""
    pipe = getattr(diffusers, PIPELINE_CLASSES[kind]).from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    extra = {"height": 16, "width": 16, "max_sequence_length": 16} if kind == "flux" else {}
    with torch.no_grad():
        pipe(prompt=PROMPTS[:1], num_inference_steps=T, guidance_scale=1.0, output_type="latent", **extra, **call)
    return pipe.scheduler.sigmas.double()


@pytest.mark.parametrize("variant", list(SCHEDULER_VARIANTS))
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flows_sample_on_the_grid_their_pipeline_samples_on(pipelines, tmp_path, kind, variant):
    """tsf's grid is the pipeline's own (its scheduler's set_timesteps with its shift, dynamic shifting with mu
    from the pipeline's calculate_shift, shift_terminal), bit for bit, for the tiny pipelines' default schedulers
    (SD3: shift 3; FLUX: no shift) and with shift_terminal and dynamic shifting set."""
    path = with_scheduler(pipelines, kind, tmp_path, **SCHEDULER_VARIANTS[variant])
    extra = {"height": 16, "width": 16} if kind == "flux" else {}
    m = FAMILIES[kind](pretrained=str(path), num_steps=5, **extra).load()
    grid = pipeline_grid(path, kind, 5)
    assert torch.equal(m._grid, grid), (m._grid, grid)
    assert float(grid[0]) == 1.0 and float(grid[-1]) == 0.0
    if variant != "default":  # the setting does move the grid (off the default's)
        assert not torch.allclose(grid, pipeline_grid(pipelines[kind], kind, 5))


def test_time_grid_and_shift_options_go_through_the_scheduler(pipelines, tmp_path):
    T = 4  # model()'s num_steps
    # uniform: the points 1 - k / T handed to set_timesteps (the scheduler shifts them), as a pipeline's sigmas
    m = model(pipelines, "sd3", time_grid="uniform").load()
    assert torch.equal(m._grid, pipeline_grid(pipelines["sd3"], "sd3", T, sigmas=[1 - i / T for i in range(T)]))
    assert not torch.equal(m._grid, model(pipelines, "sd3").load()._grid)  # SD3's own spacing is another
    # shift: the scheduler's shift replaced (and its dynamic shifting off)
    shifted = model({"sd3": with_scheduler(pipelines, "sd3", tmp_path, shift=2.0)}, "sd3").load()
    assert torch.equal(model(pipelines, "sd3", shift=2.0).load()._grid, shifted._grid)
    assert shifted.shift == 2.0 and model(pipelines, "sd3").load().shift == 3.0
    # reference: sqrt(1 - (k / T)^2), shifted by the scheduler
    ref = model(pipelines, "sd3", time_grid="reference").load()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=[(1 - (i / T) ** 2) ** 0.5 for i in range(T)])
    assert torch.equal(ref._grid, sched.sigmas.double())


# -- placement: text encoders off the device after encoding, model CPU offload ------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_text_encoders_are_not_moved_with_the_model_unless_kept(pipelines, kind):
    """The text encoders are no submodules (so moving the model to a GPU leaves them on the CPU, and they go to
    the device only while they encode); ``keep_text_encoders_on_device`` makes them submodules. Here on the CPU,
    the dtype stands for the device: ``Module.to`` casts and moves the same modules."""
    m = model(pipelines, kind).load()
    encoders = m._text_encoders
    assert len(encoders) == (1 if kind == "sd15" else 3)
    inside = {id(mod) for mod in m.modules()}
    assert not any(id(te) in inside for te in encoders)
    m.to(torch.float64)
    assert m.net.dtype == torch.float64 and all(te.dtype == torch.float32 for te in encoders)
    kept = model(pipelines, kind, keep_text_encoders_on_device=True).load()
    kept.to(torch.float64)
    assert all(te.dtype == torch.float64 for te in kept._text_encoders)
    # the samples are the same either way
    a = BaseSampler().sample(model(pipelines, kind), None, PROMPTS, range(2), seed=1).x0
    b = BaseSampler().sample(model(pipelines, kind, keep_text_encoders_on_device=True), None, PROMPTS, range(2), seed=1).x0
    assert torch.equal(a, b)


def test_cpu_offload_runs_through_diffusers_hooks(pipelines):
    """``cpu_offload`` is diffusers' ``enable_model_cpu_offload``: accelerate hooks on every component's forward,
    which tsf's own calls of the denoiser and the VAE go through. On this CPU the hooks' device is the CPU (what
    they move where is for the GPU test); the samples are the same, and gradients through a decode are refused."""
    from tsf.errors import ConfigError

    m = model(pipelines, "sd15", cpu_offload="cpu").load()
    for part in (m.net, m.vae, *m._text_encoders):
        assert hasattr(part, "_hf_hook")
    out = BaseSampler().sample(m, None, PROMPTS, range(2), seed=1)
    ref = BaseSampler().sample(model(pipelines, "sd15"), None, PROMPTS, range(2), seed=1)
    assert torch.equal(out.x0, ref.x0)
    x0 = out.x0.clone().requires_grad_(True)
    with pytest.raises(ConfigError, match="no gradient"):
        m.decode(x0)
    from baselines import DRaFT

    with pytest.raises(ConfigError, match="cpu_offload false"):
        DRaFT(model(pipelines, "sd15", cpu_offload="cpu"), reward="brightness", cross_rewards=[], conditions=["a"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            model(pipelines, "sd15", cpu_offload=True).load()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_text_encoders_leave_the_gpu_and_cpu_offload_on_cuda(pipelines, kind):
    cuda = torch.device("cuda", torch.cuda.current_device())
    m = model(pipelines, kind).load().to(cuda)
    assert all(p.device.type == "cpu" for te in m._text_encoders for p in te.parameters())
    seen = []
    hook = m._text_encoders[0].register_forward_pre_hook(lambda mod, args: seen.append(next(mod.parameters()).device))
    c = m.encode_conditions(PROMPTS)
    hook.remove()
    assert seen and seen[0].type == "cuda"  # they encoded on the GPU
    assert all(p.device.type == "cpu" for te in m._text_encoders for p in te.parameters())  # and left it
    assert c.device.type == "cuda" and m.prompts.get("emb", c).device.type == "cuda"
    out = BaseSampler().sample(m, None, PROMPTS, range(2), seed=1)
    kept = model(pipelines, kind, keep_text_encoders_on_device=True).load().to(cuda)
    ref = BaseSampler().sample(kept, None, PROMPTS, range(2), seed=1)
    assert all(p.device.type == "cuda" for te in kept._text_encoders for p in te.parameters())
    torch.testing.assert_close(out.x0, ref.x0, atol=1e-5, rtol=0)
    # diffusers' model offload: each component on the GPU while it runs, the denoiser back on the CPU after decoding
    off = model(pipelines, kind, cpu_offload=True).load()
    assert off.device == cuda
    res = BaseSampler().sample(off, None, PROMPTS, range(2), seed=1)
    assert res.x0.device.type == "cuda" and next(off.net.parameters()).device.type == "cpu"
    assert next(off.vae.parameters()).device.type == "cuda"
    torch.testing.assert_close(res.x0, ref.x0, atol=1e-5, rtol=0)


# -- loading ---------------------------------------------------------------------------------------------------
def test_revision_selects_the_hub_snapshot(tmp_path):
    """A hub name at a ``revision`` (a branch or a commit) loads that snapshot: an offline hub cache whose
    ``main`` and ``v2`` are two different tiny pipelines, read by a process with HF_HUB_CACHE pointing at it."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--tsf-test--tiny-sd"
    first = {}
    for rev, seed, commit in (("main", 0, "a" * 40), ("v2", 1, "b" * 40)):
        path = tiny_pipeline("sd15", repo / "snapshots" / commit, seed=seed)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / rev).write_text(commit)
        first[rev] = float(StableDiffusion(pretrained=str(path)).load().net.conv_in.weight.flatten()[0])
    assert first["main"] != first["v2"]
    code = ("from tsf.models import StableDiffusion\n"
            "for rev in (None, 'main', 'v2', 'b' * 40):\n"
            "    m = StableDiffusion(pretrained='tsf-test/tiny-sd', revision=rev).load()\n"
            "    print(float(m.net.conv_in.weight.flatten()[0]))\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [float(v) for v in res.stdout.split()] == [first["main"], first["main"], first["v2"], first["v2"]]


def hub_cache(pipelines, kind, root):
    """The tiny ``kind`` pipeline in a Hugging Face hub cache directory at ``root`` (huggingface_hub's layout:
    ``models--<org>--<name>/snapshots/<commit>/``, ``refs/main`` holding the commit), as repo ``tsf-test/tiny-<kind>``."""
    import shutil

    repo = root / f"models--tsf-test--tiny-{kind}"
    if not repo.exists():
        shutil.copytree(pipelines[kind], repo / "snapshots" / ("d" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("d" * 40)
    return f"tsf-test/tiny-{kind}"


def denoiser_weights(m):
    return {k: v.clone() for k, v in m.net.state_dict().items()}


@pytest.mark.parametrize("kind", list(PIPELINE_CLASSES))
def test_loading_options_reach_from_pretrained_local_files_only_and_a_cache_dir(pipelines, tmp_path, kind,
                                                                              monkeypatch):
    """``local_files_only``, ``cache_dir``, ``token``, ``use_safetensors`` and ``device_map`` go to diffusers'
    ``from_pretrained``
    on every family: a hub name loads from a cache directory of its own, with no network (local files only),
    the same weights as the saved pipeline; without that cache directory the same name is a clear error."""
    seen = []
    original = diffusers.DiffusionPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):  # diffusers' own from_pretrained, its keyword arguments recorded
        seen.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(spy))
    name = hub_cache(pipelines, kind, tmp_path / "cache")
    options = dict(local_files_only=True, cache_dir=str(tmp_path / "cache"), token="hf_not_used_offline",
                   use_safetensors=True, device_map="cpu")
    loaded = FAMILIES[kind](pretrained=name, num_steps=4, **options,
                            **({"height": 16, "width": 16} if kind == "flux" else {})).load()
    assert {k: seen[-1][k] for k in options} == options
    reference = denoiser_weights(model(pipelines, kind).load())
    assert all(torch.equal(v, reference[k]) for k, v in denoiser_weights(loaded).items())
    with pytest.raises(ConfigError, match=r"cannot load .*tsf-test/tiny-.*local_files_only"):
        FAMILIES[kind](pretrained=name, local_files_only=True, cache_dir=str(tmp_path / "other")).load()


def test_loading_options_are_config_fields(tmp_path):
    """The options are fields of the model's config (``Option 'local_files_only' is not accepted`` before)."""
    import yaml

    from tsf.cli import main

    with pytest.raises(SystemExit) as done, contextlib.redirect_stdout(io.StringIO()) as out:
        main(["sample", "--config", str(ROOT / "configs/sd15/best_of_n.yaml"),
              "--model.init_args.base.init_args.local_files_only=true",
              f"--model.init_args.base.init_args.cache_dir={tmp_path}",
              "--model.init_args.base.init_args.use_safetensors=true",
              "--model.init_args.base.init_args.quantization_config={class_path: diffusers.TorchAoConfig, init_args: "
              "{quant_type: {class_path: torchao.quantization.Int8WeightOnlyConfig}}}", "--print_config"])
    assert done.value.code in (0, None)
    base = yaml.safe_load(out.getvalue())["model"]["init_args"]["base"]["init_args"]
    assert base["local_files_only"] is True and base["cache_dir"] == str(tmp_path) and base["use_safetensors"] is True
    assert base["quantization_config"]["class_path"] == "diffusers.TorchAoConfig"
    with pytest.raises(ConfigError, match="quantization_config takes"):
        StableDiffusion(pretrained="x", quantization_config={"quant_method": "int8"})


@pytest.mark.parametrize("kind", ["sd15", "flux"])
def test_a_quantization_config_quantizes_the_denoiser_on_the_cpu(pipelines, kind):
    """diffusers' ``TorchAoConfig`` (int8 weight-only, which runs on the CPU) through ``quantization_config``, as
    an object and as a config file's mapping: the denoiser's linear layers hold torchao's int8 weights, the VAE
    and text encoders are untouched, and the model samples close to the float one."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    as_object = diffusers.TorchAoConfig(Int8WeightOnlyConfig())
    as_mapping = {"class_path": "diffusers.TorchAoConfig",
                  "init_args": {"quant_type": {"class_path": "torchao.quantization.Int8WeightOnlyConfig"}}}
    plain = model(pipelines, kind).load()
    ref = BaseSampler().sample(plain, None, PROMPTS, range(2), seed=3)
    for config in (as_object, as_mapping):
        q = model(pipelines, kind, quantization_config=config).load()
        linear = [mod for mod in q.net.modules() if isinstance(mod, torch.nn.Linear)]
        assert linear and all(mod.weight.qdata.dtype == torch.int8 for mod in linear)  # torchao's Int8Tensor
        vae_linear = [mod for mod in q.vae.modules() if isinstance(mod, torch.nn.Linear)]
        assert vae_linear and all(type(mod.weight) is torch.nn.Parameter for mod in vae_linear)
        out = BaseSampler().sample(q, None, PROMPTS, range(2), seed=3)
        err = (out.images - ref.images).abs().max()
        assert 0 < err < 0.2, err  # quantized (not the same bits), close to the float model
        assert q.cache_key() != plain.cache_key()  # (the reference samples of a quantized model are its own)


def test_flux_latent_packing_is_the_pipelines(pipelines):
    """tsf writes out FLUX's (private) packing helpers; they agree with the pipeline's."""
    from tsf.models.pipelines import latent_image_ids, pack_latents, unpack_latents

    x = torch.randn(3, 16, 6, 10)
    packed = pack_latents(x)
    assert torch.equal(packed, diffusers.FluxPipeline._pack_latents(x, 3, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(unpack_latents(packed, 6, 10), diffusers.FluxPipeline._unpack_latents(packed, 48, 80, 8))
    assert torch.equal(latent_image_ids(3, 5, "cpu", torch.float32),
                       diffusers.FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))
