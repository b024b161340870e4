"""Base sampler and Best-of-N on the embedded digits model: reward, counted compute, seeding."""

import pytest
import torch

from tsf.errors import ConfigError
from tsf.models import DigitsDiffusion
from tsf.rewards import build_reward
from tsf.samplers import SAMPLERS, BaseSampler, BestOfN, Noise
from tsf.samplers.base import sample_seed

T = 20


@pytest.fixture(scope="module")
def model():
    return DigitsDiffusion(num_steps=T).load()


@pytest.fixture(scope="module")
def reward():
    return build_reward("digit").load()


def test_best_of_n_beats_base_at_same_seeds_and_costs_n_times_the_nfe(model, reward):
    n = 200
    conds, ids = [i % 10 for i in range(n)], range(n)
    base = BaseSampler().sample(model, reward, conds, ids, seed=0)
    bon = BestOfN(num_particles=8).sample(model, reward, conds, ids, seed=0)
    r_base, r_bon = reward(base.images, conds), reward(bon.images, conds)
    torch.testing.assert_close(r_bon, bon.rewards)
    diff = r_bon - r_base
    # paired comparison on the same sample ids: the mean gain is > 3 standard errors
    assert diff.mean() > 3 * diff.std() / n**0.5
    assert diff.mean() > 0.5
    # compute as counted by hooks on the model and the reward
    assert base.compute["nfe"] == n * T
    assert bon.compute["nfe"] == 8 * base.compute["nfe"]
    assert base.compute["reward_calls"] == 0 and bon.compute["reward_calls"] == 8 * n
    assert bon.compute["nfe_grad"] == 0 and bon.compute["seconds"] > 0


def test_same_seed_same_samples_whatever_the_batching(model, reward):
    conds, ids = [i % 10 for i in range(40)], list(range(40))
    s = BestOfN(num_particles=4)
    a = s.sample(model, reward, conds, ids, seed=7)
    again = s.sample(model, reward, conds, ids, seed=7)
    assert torch.equal(a.x0, again.x0)
    # other batch splits (including batches smaller than 16 rows) and another chunk size
    for size in (1, 3, 13, 25):
        parts = [s.sample(model, reward, conds[i:i + size], ids[i:i + size], seed=7) for i in range(0, 40, size)]
        assert torch.equal(torch.cat([p.x0 for p in parts]), a.x0), size
    chunked = BestOfN(num_particles=4, max_batch=24).sample(model, reward, conds, ids, seed=7)
    assert torch.equal(chunked.x0, a.x0)
    other = s.sample(model, reward, conds, ids, seed=8)
    assert not torch.equal(other.x0, a.x0)


def test_padding_rows_are_not_counted(model, reward):
    out = BestOfN(num_particles=2).sample(model, reward, [1, 2, 3], [0, 1, 2], seed=0)  # 6 rows, padded to 16
    assert out.compute["nfe"] == 6 * T and out.compute["reward_calls"] == 6


def test_noise_streams_are_per_sample_id():
    a = Noise(0, [5, 6], "cpu").randn(3, (2,))
    b = Noise(0, [6], "cpu").randn(3, (2,))
    assert torch.equal(a[3:], b)
    assert not torch.equal(a[:3], a[3:])
    assert sample_seed(0, 1) != sample_seed(1, 0)


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_a_sample_s_noise_is_its_own_draws_whatever_the_counts_of_the_others(kind):
    """Draws of different counts per sample (RBF's children) read each sample's stream as if it were drawn alone:
    the numbers are those of sample b's generator called with the same block rule, in order."""
    import random

    from tsf.samplers.base import _Stream

    B, block = 5, 16
    fill = torch.randn if kind == "normal" else torch.rand
    stream = _Stream([torch.Generator().manual_seed(b) for b in range(B)], kind, torch.float32, block)
    alone = [torch.Generator().manual_seed(b) for b in range(B)]
    left = [torch.empty(0) for _ in range(B)]

    def take_alone(b, n):
        if len(left[b]) < n:
            left[b] = torch.cat([left[b], fill(max(block, n - len(left[b])), generator=alone[b])])
        out, left[b] = left[b][:n], left[b][n:]
        return out

    rng = random.Random(0)
    for step in range(120):
        if step % 40 < 3:  # equal counts (every sample the same draw) between the uneven ones
            n = rng.randint(0, 20)
            got, want = stream.take(n), torch.stack([take_alone(b, n) for b in range(B)])
        else:
            counts = [rng.randint(0, 40) for _ in range(B)]
            got, want = stream.take_counts(counts), torch.cat([take_alone(b, c) for b, c in enumerate(counts)])
        assert torch.equal(got.reshape(-1), want.reshape(-1)), step


@pytest.mark.parametrize("k", [0, -3, 2.5])
def test_num_particles_must_be_a_positive_integer(k):
    with pytest.raises(ConfigError, match="num_particles"):
        BestOfN(num_particles=k)


def test_samplers_registry_and_reward_requirement(model):
    assert {"base", "best_of_n"} <= set(SAMPLERS.names())
    with pytest.raises(ConfigError, match="needs a reward"):
        BestOfN(2).sample(model, None, [0], [0])
    with pytest.raises(ConfigError, match="known samplers"):
        SAMPLERS.get("svdd_typo")
