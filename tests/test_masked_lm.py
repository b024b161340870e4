"""A Hugging Face masked language model as a masked-diffusion denoiser, end to end through `tsf sample`, offline:
a tiny random BertForMaskedLM and a tiny random sequence classifier built from config, saved with save_pretrained."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from tsf.cli import load_samples, main

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "red", "blue", "happy", "sad", "and", "ran", "big", "small"]


def tiny_bert(root: Path) -> tuple[Path, Path]:
    from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, BertTokenizerFast)

    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})
    cfg = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               max_position_embeddings=64)
    torch.manual_seed(0)
    lm, clf = root / "mlm", root / "clf"
    BertForMaskedLM(BertConfig(**cfg)).save_pretrained(lm)
    tok.save_pretrained(lm)
    BertForSequenceClassification(BertConfig(**cfg, num_labels=2, id2label={0: "neg", 1: "pos"},
                                             label2id={"neg": 0, "pos": 1})).save_pretrained(clf)
    tok.save_pretrained(clf)
    return lm, clf


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("bert"))


def test_masked_lm_samples_words_after_its_prefix_and_keeps_the_prefix(bert):
    from tsf.models import MaskedLM
    from tsf.rewards import KeywordReward
    from tsf.samplers import BaseSampler, BestOfN

    lm, _ = bert
    model = MaskedLM(str(lm), seq_len=6, prefix="the cat", num_steps=4, local_files_only=True).load()
    out = BaseSampler().sample(model, None, [None] * 8, range(8), seed=0)
    assert out.x0.shape == (8, 8) and out.x0.dtype == torch.long
    assert (out.x0[:, :2] == model.prefix_ids).all()
    special = set(model.tokenizer.all_special_ids)
    assert not any(int(t) in special for t in out.x0.flatten())  # never the mask or another special token
    texts = model.texts(out.x0)
    assert all(len(t.split()) == 6 and set(t.split()) <= set(WORDS) for t in texts), texts
    reward = KeywordReward(["dog"])
    reward.bind(model)
    bon = BestOfN(num_particles=8).sample(model, reward, [None] * 8, range(8), seed=0)
    torch.testing.assert_close(bon.rewards, reward(bon.x0))
    assert reward(bon.x0).mean() > reward(out.x0).mean()


def test_tsf_sample_runs_a_masked_lm_with_a_text_classifier_reward(bert, tmp_path):
    lm, clf = bert
    config = {
        "model": {"class_path": "tsf.lightning.SamplingModule", "init_args": {
            "base": {"class_path": "tsf.models.MaskedLM",
                     "init_args": {"pretrained": str(lm), "seq_len": 5, "prefix": "a", "num_steps": 4,
                                   "local_files_only": True}},
            "sampler": {"class_path": "tsf.samplers.SVDD", "init_args": {"num_particles": 4}},
            "reward": {"class_path": "tsf.rewards.TextClassifierReward",
                       "init_args": {"pretrained": str(clf), "label": "pos", "local_files_only": True}},
            "cross_rewards": [{"class_path": "tsf.rewards.KeywordReward", "init_args": {"words": ["happy"]}}],
            "fidelity_samples": 0}},
        "data": {"class_path": "tsf.lightning.SampleIdsDataModule",
                 "init_args": {"num_samples": 6, "seed": 0, "batch_size": 6}},
        "trainer": {"accelerator": "cpu", "devices": 1}}
    path = tmp_path / "mlm.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["sample", "--config", str(path), f"--output_dir={tmp_path / 'runs'}", "--wandb_mode=disabled",
          "--trainer.enable_progress_bar=false"])
    (run,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["target/mean"] <= 0 and "cross/keywords/mean" in metrics and 0 <= metrics["diversity/hamming"] <= 1
    s = load_samples(run)
    assert s["x0"].shape == (6, 6) and len(s["texts"]) == 6 and all(isinstance(t, str) for t in s["texts"])
    assert metrics["compute/nfe"] == 1 + 4 * 3  # SVDD: 1 + M (T - 1) per sample
