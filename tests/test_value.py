"""The SVDD-MC value network: trained by Lightning fit on rollouts, exported, used by SVDD."""

import lightning as L
import pytest
import torch

from tsf.errors import ConfigError
from tsf.lightning import ValueModule
from tsf.models import DigitsDiffusion
from tsf.rewards import build_reward
from tsf.samplers import SVDD, LearnedValue


def test_value_module_fits_exports_and_drives_svdd(tmp_path):
    T = 5
    module = ValueModule(DigitsDiffusion(num_steps=T), "digit", conditions=list(range(10)), num_rollouts=256,
                         batch_size=128, width=64, depth=1, hidden=64)
    trainer = L.Trainer(max_epochs=3, default_root_dir=str(tmp_path), logger=False, enable_checkpointing=True,
                        enable_progress_bar=False, enable_model_summary=False)
    module.setup("fit")
    x, t, labels, r = module.data.tensors
    assert x.shape == (256 * T, 1, 8, 8) and len(t.unique()) == T and torch.isfinite(r).all()
    before = torch.nn.functional.mse_loss(module.net(x[:512], t[:512], labels[:512]).squeeze(1), r[:512]).item()
    trainer.fit(module)
    after = torch.nn.functional.mse_loss(module.net(x[:512], t[:512], labels[:512]).squeeze(1), r[:512]).item()
    assert after < before
    path = tmp_path / "value.safetensors"
    assert path.is_file() and list((tmp_path / "checkpoints").glob("*.ckpt"))

    value = LearnedValue(str(path)).load()
    model, reward = DigitsDiffusion(num_steps=T).load(), build_reward("digit").load()
    n = 12
    out = SVDD(num_particles=4, value=value).sample(model, reward, [i % 10 for i in range(n)], range(n))
    assert out.compute["nfe"] == n * T  # no look-ahead model calls: the network values the children
    assert out.compute["reward_calls"] == n * 4  # the last step is selected by the true reward


def test_missing_value_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="tsf fit.*configs/digits/value.yaml"):
        LearnedValue(str(tmp_path / "nope.safetensors"))
