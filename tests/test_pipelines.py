"""Real-model code on tiny random diffusers pipelines (SD 1.x, SDXL, SD3, FLUX) built from config,
saved to a temp directory and loaded through the same ``pretrained`` path a user gives."""

from pathlib import Path

import diffusers
import pytest
import torch

from tiny import tiny_pipeline
from tsf.bench import WorkCounter
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


def diffusers_images(pipelines, kind, m, noise, guidance):
    """The same prompts and initial latents through the diffusers pipeline itself."""
    pipe = m._pipe
    T = m.num_steps
    kw = dict(prompt=PROMPTS, num_inference_steps=T, guidance_scale=guidance, output_type="pt")
    if kind in ("sd15", "sd2v", "sdxl"):  # tsf's kernel is DDIM's whatever scheduler the checkpoint names
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        kw.update(latents=noise, eta=0.0)
    else:  # the flows: the uniform grid s_k = 1 - k / T, shifted by the scheduler as tsf shifts it
        kw.update(sigmas=[1 - k / T for k in range(T)])
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
REAL_CONFIGS = {"sd15/best_of_n": "sd15", "sd15/svdd_pm": "sd15", "sd15/das": "sd15", "sdxl/das": "sdxl",
                "sd3/rbf": "sd3", "sd3/best_of_n": "sd3", "flux/rbf": "flux", "flux/best_of_n": "flux"}
SMALL_SAMPLERS = {"BestOfN": ["num_particles=2"], "SVDD": ["num_particles=2"], "SMC": ["num_particles=2"],
                  "RBF": ["budget=12", "n0=2", "proposal_batch=2"]}


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
    if sampler == "SMC":
        assert m["compute/nfe_grad"] > 0  # DAS: gradients through the denoiser, the VAE and the CLIP reward
    s = load_samples(run)
    assert s["images"].shape == (3, 3, 16, 16) and s["sample_id"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("method", ["draft", "ddpo"])
def test_finetuning_baselines_train_lora_on_a_real_model_config(pipelines, tiny_clip, tmp_path, method):
    from tsf.cli import main

    base = "--model.init_args.base.init_args"
    main(["finetune", "--config", str(ROOT / f"configs/sd15/{method}.yaml"), f"{base}.pretrained={pipelines['sd15']}",
          f"{base}.num_steps=3", f"{base}.height=16", f"{base}.width=16", f"{base}.dtype=float32",
          f"--model.init_args.reward.init_args.model={tiny_clip}",
          f"--model.init_args.reward.init_args.head={tiny_clip / 'head.pth'}",
          f"--model.init_args.cross_rewards=[{{class_path: tsf.rewards.ClipScore, init_args: {{model: {tiny_clip}}}}}]",
          "--model.init_args.batch_size=2", "--model.init_args.val_samples=2", "--trainer.max_steps=2",
          "--trainer.val_check_interval=2", "--trainer.accelerator=cpu", "--trainer.logger=false",
          "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
          *(["--model.init_args.micro_batch=1"] if method == "ddpo" else [])])
    from peft import PeftModel
    from safetensors.torch import load_file

    lora = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in lora.items())  # B starts at zero: it trained
    assert (tmp_path / "val_metrics.jsonl").read_text().count("target/mean") == 1
    # the adapter loads back onto the model through the `adapter` option, as the configs' header says
    m = StableDiffusion(pretrained=str(pipelines["sd15"]), num_steps=2, adapter=str(tmp_path / "adapter")).load()
    assert isinstance(m.net, PeftModel)
