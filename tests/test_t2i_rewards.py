"""Text-to-image rewards (aesthetic, CLIP score, PickScore, HPSv2, ImageReward, incompressibility), their one
preprocessing, prompt sets and the evaluator's per-prompt breakdown, on tiny random CLIP models saved to disk."""

import contextlib
from pathlib import Path
from typing import Union

import numpy as np
import pytest
import yaml
import torch
from jsonargparse import ArgumentParser
from PIL import Image
from torch.nn import functional as F

import tsf.rewards.clip as C
from tiny import clip_model_dir
from tsf.data.prompts import load_prompts, shipped_sets
from tsf.errors import ConfigError
from tsf.evaluation import Evaluator, mean_pairwise_distance, pairwise_cosine_distance, vendi_score
from tsf.lightning.data import SampleIdsDataModule
from tsf.rewards import REWARDS, Compressibility, Reward, build_reward
from tsf.samplers.base import SampleBatch

PROMPTS = ["a cat", "a dog riding a bike", "horse"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return clip_model_dir(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def head_path(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("head") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(C.AestheticHead(16).state_dict(), path)
    return path


def from_config(class_path: str, **init_args) -> Reward:
    """A reward the way a YAML config gives one: ``class_path`` + ``init_args``, through jsonargparse."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=Union[str, Reward])
    cfg = parser.parse_object({"reward": {"class_path": class_path, "init_args": init_args}})
    reward = build_reward(parser.instantiate_classes(cfg).reward)
    return reward.load()


@pytest.fixture(scope="module")
def rewards(clip_dir, head_path):
    return {
        "aesthetic": from_config("tsf.rewards.AestheticScore", head=str(head_path), model=str(clip_dir)),
        "clip_score": from_config("tsf.rewards.ClipScore", model=str(clip_dir)),
        "pickscore": from_config("tsf.rewards.PickScore", model=str(clip_dir), processor=str(clip_dir)),
    }


def images(n=3, h=48, w=40, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_new_rewards_are_registered():
    assert {"aesthetic", "clip_score", "pickscore", "hpsv2", "image_reward", "incompressibility"} <= set(REWARDS.names())


@pytest.mark.parametrize("name", ["aesthetic", "clip_score", "pickscore"])
def test_clip_rewards_score_shape_features_and_gradients(rewards, name):
    r = rewards[name]
    assert r.differentiable and r.has_features
    x = images().requires_grad_(True)
    out = r(x, PROMPTS)
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    f = r.features(x.detach())
    assert f.shape == (3, 16)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(3))


def test_scores_match_transformers_clip_on_the_preprocessed_images(rewards, clip_dir, head_path):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(clip_dir))(PROMPTS, padding=True, truncation=True, return_tensors="pt")
    x = images()
    pixels = C.preprocess(x, rewards["clip_score"].spec)
    with torch.no_grad():
        out = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixels)
        logits = out.logits_per_image.diagonal()
        head = C.AestheticHead(16)
        head.load_state_dict(torch.load(head_path))
        aesthetic = head.eval()(F.normalize(out.image_embeds, dim=-1)).squeeze(-1)
        torch.testing.assert_close(rewards["pickscore"](x, PROMPTS), logits)
        torch.testing.assert_close(rewards["clip_score"](x, PROMPTS), 100 * logits / model.logit_scale.exp())
        torch.testing.assert_close(rewards["aesthetic"](x), aesthetic)
        torch.testing.assert_close(rewards["clip_score"].features(x), F.normalize(out.image_embeds, dim=-1))


def test_preprocessing_follows_the_image_processor_config(clip_dir, rewards):
    """The tensor preprocessing reproduces CLIPImageProcessor (PIL) on a non-square image, up to uint8 rounding."""
    from transformers import AutoImageProcessor

    spec = rewards["aesthetic"].spec
    assert spec == C.ImageSpec(size=32, crop=(32, 32), mode="bicubic")
    arr = (np.random.default_rng(0).random((57, 44, 3)) * 255).round().astype(np.uint8)  # noise: filters differ most
    ref = AutoImageProcessor.from_pretrained(str(clip_dir))(Image.fromarray(arr), return_tensors="pt")
    ours = C.preprocess(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255, spec)
    assert ours.shape == ref["pixel_values"].shape == (1, 3, 32, 32)
    assert (ours - ref["pixel_values"]).abs().mean() < 0.01  # ~ uint8 rounding (bilinear instead: 0.1)


@pytest.mark.parametrize("name", ["aesthetic", "clip_score", "pickscore"])
def test_guidance_and_evaluation_use_the_same_preprocessing(rewards, name, monkeypatch):
    r = rewards[name]
    calls = []

    def spy(imgs, spec):
        out = original(imgs, spec)
        calls.append((torch.is_grad_enabled(), out.detach().clone()))
        return out

    original = C.preprocess
    monkeypatch.setattr(C, "preprocess", spy)
    x = images(seed=3)
    guided = x.clone().requires_grad_(True)
    with torch.enable_grad():  # a gradient sampler's call (DAS, DPS, DRaFT)
        g = r(guided, PROMPTS)
    torch.autograd.grad(g.sum(), guided)
    ev = Evaluator(r, [], r)
    batch = SampleBatch(x0=x, images=x, sample_ids=torch.arange(3))
    evaluated = ev.rewards(batch, PROMPTS)[r.name]  # the evaluator's call (no grad)
    assert [grad for grad, _ in calls] == [True, False]
    # bitwise (the evaluator's chunked call may pad the batch with extra rows: compare the real ones)
    assert torch.equal(calls[0][1], calls[1][1][:3])
    # the same scores, up to the float rounding of a differently sized matmul
    torch.testing.assert_close(g.detach(), evaluated, rtol=1e-5, atol=1e-6)


def test_non_prompt_conditions_are_refused(rewards):
    for name in ("clip_score", "pickscore"):
        with pytest.raises(ConfigError, match="prompts"):
            rewards[name].check_conditions(["a cat", 3])
    rewards["aesthetic"].check_conditions([None, 3])  # no text: any condition


def test_missing_weights_say_what_to_download_and_which_field(tmp_path, clip_dir):
    with pytest.raises(ConfigError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth.*init_args\.head"):
        from_config("tsf.rewards.AestheticScore", head=str(tmp_path / "nope.pth"), model=str(clip_dir))
    with offline_hub(tmp_path / "empty-cache"), pytest.raises(
            ConfigError, match=r"trl-lib/ddpo-aesthetic-predictor.*init_args\.head_repo.*init_args\.head"):
        build_reward("aesthetic").load()  # no head given, none in the (empty) cache, offline
    with pytest.raises(ConfigError, match=r"huggingface-cli download yuvalkirstain/PickScore_v1.*init_args\.model"):
        from_config("tsf.rewards.PickScore", model=str(tmp_path / "PickScore_v1"), processor=str(clip_dir))
    with pytest.raises(ConfigError, match=r"does not exist.*openai/clip-vit-large-patch14"):
        from_config("tsf.rewards.ClipScore", model=str(tmp_path / "clip"))
    bad = tmp_path / "head.pth"
    torch.save(C.AestheticHead(8).state_dict(), bad)
    with pytest.raises(ConfigError, match="768"):  # a head for another embedding size
        from_config("tsf.rewards.AestheticScore", head=str(bad), model=str(clip_dir))
    with pytest.raises(ConfigError, match=r"huggingface-cli download xswu/HPSv2 HPS_v2\.1.*init_args\.checkpoint"):
        from_config("tsf.rewards.HPSv2", checkpoint=str(tmp_path / "HPS_v2.1_compressed.pt"))
    with pytest.raises(ConfigError, match=r"THUDM/ImageReward.*init_args\.checkpoint"):
        from_config("tsf.rewards.ImageRewardScore", checkpoint=str(tmp_path / "ImageReward.pt"))


def test_missing_optional_packages_say_what_to_pip_install(tmp_path):
    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(b"")
    for mods, cls, pip in ((("open_clip", "hpsv2"), "tsf.rewards.HPSv2", "pip install hpsv2"),
                           (("ImageReward",), "tsf.rewards.ImageRewardScore", "pip install image-reward")):
        if any(_importable(m) for m in mods):
            continue
        with pytest.raises(ConfigError, match=pip):
            from_config(cls, checkpoint=str(ckpt))


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_incompressibility_is_minus_compressibility():
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    inc = build_reward("incompressibility")
    assert inc.name == "incompressibility" and not inc.differentiable
    torch.testing.assert_close(inc(x), -Compressibility()(x))
    flat = torch.full((1, 3, 16, 16), 0.5)
    assert inc(torch.cat([flat, x[:1]]))[1] > inc(torch.cat([flat, x[:1]]))[0]  # noise is larger


# -- prompt sets ------------------------------------------------------------------------------
def test_shipped_prompt_sets():
    assert {"animals", "animal_photos", "animal_activities"} <= set(shipped_sets())
    animals = load_prompts("animals")
    assert len(animals) == 45 == len(set(animals)) and animals[:3] == ["cat", "dog", "horse"]
    assert all(not a.startswith("#") and a == a.strip() and a for a in animals)
    assert load_prompts("animal_photos")[0] == "a photo of a cat"
    acts = load_prompts("animal_activities")
    assert len(acts) == 135 and "an ant riding a bike" in acts


def test_user_prompt_file_and_errors(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# my prompts\n\na red car  \n  # indented comment\nan astronaut riding a horse\n\n")
    assert load_prompts(str(f)) == ["a red car", "an astronaut riding a horse"]
    assert load_prompts(["x", "y"]) == ["x", "y"]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(ConfigError, match="not a shipped prompt set.*animals"):
        load_prompts("animalz")
    if not _importable("datasets"):
        with pytest.raises(ConfigError, match="pip install datasets"):
            load_prompts("hf:nateraw/parti-prompts")


def test_data_module_takes_a_prompt_set(tmp_path):
    dm = SampleIdsDataModule(num_samples=50, prompts="animals")
    conds = dm.sample_conditions()
    assert conds[0] == "cat" and conds[45] == "cat" and conds[44] == "kangaroo"
    f = tmp_path / "p.txt"
    f.write_text("one\ntwo\n")
    assert SampleIdsDataModule(num_samples=3, prompts=str(f)).sample_conditions() == ["one", "two", "one"]
    assert SampleIdsDataModule(num_samples=2, conditions=[3]).sample_conditions() == [3, 3]  # unchanged
    with pytest.raises(ConfigError, match="not both"):
        SampleIdsDataModule(conditions=["a"], prompts="animals")
    assert SampleIdsDataModule(num_samples=3, prompts=["a red apple", "a cat"]).sample_conditions() == [
        "a red apple", "a cat", "a red apple"]


@pytest.mark.parametrize("command,config,section", [("sample", "configs/sd15/das.yaml", "data"),
                                                    ("finetune", "configs/sd15/draft.yaml", "model")])
def test_prompts_on_the_command_line_are_a_list_a_file_or_a_set(command, config, section, capsys):
    """``--data.init_args.prompts='["a red apple", "a photo of a cat"]'`` is a list of prompts (not "Expected a
    str"), and a file or a set's name stays a string; so in a fine-tuning config."""
    from tsf.cli import main

    root = Path(__file__).resolve().parents[1]
    for value, expected in (('["a red apple", "a photo of a cat"]', ["a red apple", "a photo of a cat"]),
                            ("my_prompts.txt", "my_prompts.txt"), ("animals", "animals")):
        with pytest.raises(SystemExit) as done:
            main([command, "--config", str(root / config), f"--{section}.init_args.prompts={value}", "--print_config"])
        assert done.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed[section]["init_args"]["prompts"] == expected


# -- evaluator: per-prompt breakdown and LPIPS ---------------------------------------------------
def test_per_prompt_breakdown_adds_up_to_the_overall_metrics(rewards):
    target, cross = rewards["clip_score"], rewards["aesthetic"]
    ev = Evaluator(target, [cross], target)
    conditions = PROMPTS  # sample i has PROMPTS[i % 3]
    x = images(n=10, seed=5)
    for ids in ([7, 2, 9, 0], [4, 1, 8, 3, 6, 5]):  # out of order, as shards arrive
        ids_t = torch.tensor(ids)
        conds = [conditions[i % 3] for i in ids]
        batch = SampleBatch(x0=x[ids_t], images=x[ids_t], sample_ids=ids_t)
        ev.update(batch, ev.rewards(batch, conds))
    overall = ev.compute()
    table = ev.per_condition(conditions)
    assert list(table) == ["a dog riding a bike", "horse", "a cat"]  # first-use order
    assert [table[p]["count"] for p in PROMPTS] == [4, 3, 3]
    total = sum(row["count"] * row["target/mean"] for row in table.values()) / 10
    assert abs(total - overall["target/mean"]) < 1e-9
    cross_total = sum(row["count"] * row["cross/aesthetic/mean"] for row in table.values()) / 10
    assert abs(cross_total - overall["cross/aesthetic/mean"]) < 1e-9
    with torch.no_grad():
        cats = x[[0, 3, 6, 9]]
        assert abs(table["a cat"]["target/mean"] - float(target(cats, ["a cat"] * 4).double().mean())) < 1e-5
        f = target.features(cats)
    assert abs(table["a cat"]["diversity/pairwise"] - pairwise_cosine_distance(f)) < 1e-6
    assert abs(table["a cat"]["diversity/vendi"] - vendi_score(f)) < 1e-5
    assert set(overall) >= {"target/mean", "diversity/pairwise", "diversity/vendi"}
    assert not any(k.startswith("per_condition") or k == "diversity/lpips" for k in overall)  # flat keys unchanged


def test_mean_pairwise_distance_and_lpips_option():
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    dist = lambda a, b: (a - b).abs().flatten(1).mean(1)  # noqa: E731
    brute = np.mean([float(dist(x[i:i + 1], x[j:j + 1])) for i in range(6) for j in range(i + 1, 6)])
    assert abs(mean_pairwise_distance(x, dist, chunk=4) - brute) < 1e-6
    sub = mean_pairwise_distance(x, dist, max_pairs=5)
    assert np.isfinite(sub) and sub != brute
    assert np.isnan(mean_pairwise_distance(x[:1], dist))
    from tsf.evaluation import lpips_unavailable

    if lpips_unavailable("alex") is not None:
        with pytest.raises(ConfigError, match="lpips.*(torchvision|weights)"):
            Evaluator(build_reward("brightness"), lpips="alex")
    with pytest.raises(ConfigError, match="unknown LPIPS backbone"):
        Evaluator(build_reward("brightness"), lpips="resnet")


def test_half_precision_weights_take_float_images_and_return_float32(clip_dir, rewards):
    r = from_config("tsf.rewards.ClipScore", model=str(clip_dir), dtype="bfloat16")
    assert r.clip.dtype == torch.bfloat16
    x = images(seed=7)
    out = r(x, PROMPTS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rewards["clip_score"](x, PROMPTS), atol=3.0, rtol=0.05)  # x100 cosine
    with pytest.raises(ValueError, match="dtype must be one of float32, float16, bfloat16"):  # at config parsing
        from_config("tsf.rewards.ClipScore", model=str(clip_dir), dtype="float8")


@contextlib.contextmanager
def offline_hub(cache: Path):
    """huggingface_hub offline, on the cache directory ``cache`` (what HF_HUB_OFFLINE=1 and HF_HUB_CACHE do to a
    new process; the hub's functions read these constants when they are called)."""
    import huggingface_hub.constants as hub

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub, "HF_HUB_OFFLINE", True)
        mp.setattr(hub, "HF_HUB_CACHE", str(cache))
        yield


def hub_cache_file(cache: Path, repo: str, filename: str, commit: str = "c" * 40) -> Path:
    """Where huggingface_hub's cache keeps ``filename`` of ``repo`` at ``main`` (its layout:
    ``models--<org>--<name>/snapshots/<commit>/<file>``, ``refs/main`` holding the commit)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    path = root / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_the_aesthetic_head_comes_from_the_hub_by_default_and_a_local_head_overrides_it(tmp_path, clip_dir, head_path):
    """With no ``head``, the head is ``hf_hub_download(head_repo, head_file)`` (the default repository and file, or
    others named); a local ``head`` file is used instead of the hub. Offline, on a hub cache built here."""
    torch.manual_seed(2)
    other = C.AestheticHead(16)
    cache = tmp_path / "hub"
    torch.save(other.state_dict(), hub_cache_file(cache, C.AESTHETIC_HEAD_REPO, C.AESTHETIC_HEAD_FILE))
    torch.save(C.AestheticHead(16).state_dict(), hub_cache_file(cache, "me/my-head", "head.pth"))
    x = images()
    with offline_hub(cache):
        from_hub = from_config("tsf.rewards.AestheticScore", model=str(clip_dir))
        named = from_config("tsf.rewards.AestheticScore", model=str(clip_dir), head_repo="me/my-head",
                            head_file="head.pth")
        local = from_config("tsf.rewards.AestheticScore", model=str(clip_dir), head=str(head_path))
        with pytest.raises(ConfigError, match=r"'nope\.pth' of 'me/my-head'"):
            from_config("tsf.rewards.AestheticScore", model=str(clip_dir), head_repo="me/my-head", head_file="nope.pth")
    with torch.no_grad():
        emb = from_hub.image_embeds(x)
        torch.testing.assert_close(from_hub(x), other.eval()(emb).squeeze(-1))
        assert not torch.allclose(named(x), from_hub(x))
        local_head = C.AestheticHead(16)
        local_head.load_state_dict(torch.load(head_path))
        torch.testing.assert_close(local(x), local_head.eval()(emb).squeeze(-1))
