"""The host loop over per-image state: DDPM bit for bit as every earlier release sampled it, the same bytes for a
(seed, index) whatever the batch, the shard, the slot or the other images in the batch (other schedulers, step
counts and seeds, admitted at other times)."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_deploy.runtime import rng
from ddpm_deploy.runtime.errors import ConfigError
from ddpm_deploy.runtime.sampling.config import plan_for
from ddpm_deploy.runtime.sampling.host import HostLoop, sample
from ddpm_deploy.runtime.schedule import DiffusionConfig, Schedule

SHAPE = (2, 4, 4)


class TanhModel:
    def eps(self, x, t):
        return np.tanh(0.9 * x + t.astype(np.float32)[:, None, None, None] * 1e-3).astype(np.float32)


def legacy_ddpm(model, cfg: DiffusionConfig, steps, shape, seed, indices) -> np.ndarray:
    """The host loop of ddpm-deploy before the sampling layer (c2e6504: runtime/sampler.py and Schedule.step), kept
    as written: float32 table (a, b, c1, c2, σ), x̂0 = a·x − b·ε, clip, μ = c1·x̂0 + c2·x, μ += σ·z."""
    s = Schedule(cfg, steps)
    table32 = np.stack([s.sqrt_recip_alphas_cumprod, s.sqrt_recipm1_alphas_cumprod, s.posterior_mean_coef1,
                        s.posterior_mean_coef2, s.sigmas], axis=1).astype(np.float32)
    idx = np.asarray(indices, dtype=np.int64)
    x = rng.normals(seed, idx, rng.INITIAL_STEP, shape)
    for i in range(len(s) - 1, -1, -1):
        t = int(s.timesteps[i])
        eps = model.eps(x, np.full(len(idx), t, np.int32))
        a, b, c1, c2, sigma = (np.float32(v) for v in table32[i])
        x0 = a * x - b * eps
        if cfg.clip_denoised:
            np.clip(x0, -1.0, 1.0, out=x0)
        mean = c1 * x0 + c2 * x
        if i > 0:
            mean += sigma * rng.normals(seed, idx, t, shape)
        x = mean
    return x


@pytest.mark.parametrize("kw, steps", [({}, None), ({}, 20), ({"variance_type": "fixed_large"}, 37),
                                       ({"clip_denoised": False}, 50), ({"schedule": "cosine"}, 25)])
def test_ddpm_is_bit_for_bit_the_loop_of_earlier_releases(kw, steps):
    cfg = DiffusionConfig(**kw)
    got = sample(TanhModel(), plan_for(cfg, "ddpm", steps), SHAPE, 11, [0, 5, 9])

    np.testing.assert_array_equal(got, legacy_ddpm(TanhModel(), cfg, steps, SHAPE, 11, [0, 5, 9]))


PLANS = [("ddpm", 12, {}), ("ddim", 8, {"eta": 1.0}), ("dpmsolver++", 9, {"solver_order": 3}),
         ("sde-dpmsolver++", 7, {}), ("unipc", 6, {"solver_order": 3})]


@pytest.mark.parametrize("name, steps, options", PLANS)
def test_same_bytes_for_any_batch_and_shard(name, steps, options):
    plan = plan_for(DiffusionConfig(), name, steps, **options)
    whole = sample(TanhModel(), plan, SHAPE, 3, range(6))
    shards = np.concatenate([sample(TanhModel(), plan, SHAPE, 3, [0, 1]), sample(TanhModel(), plan, SHAPE, 3, [2, 3, 4, 5])])
    alone = np.concatenate([sample(TanhModel(), plan, SHAPE, 3, [i]) for i in range(6)])

    np.testing.assert_array_equal(whole, shards)
    np.testing.assert_array_equal(whole, alone)


def test_a_batch_mixing_schedulers_step_counts_and_seeds_gives_each_image_its_own_bytes():
    """Images admitted at different steps into one loop, each with its own plan and seed, share every ε call and
    come out bit for bit as sampled alone: the basis of step-level serving."""
    plans = [plan_for(DiffusionConfig(), n, s, **o) for n, s, o in PLANS]
    seeds, idx = [3, 4, 3, 9, 5], [0, 7, 2, 5, 1]
    loop = HostLoop(TanhModel(), SHAPE, 4)  # fewer slots than images: the fifth waits for a free slot
    order, got, slot_of, calls = list(range(5)), {}, {}, 0
    while order or slot_of:
        free = [s for s in range(4) if s not in slot_of.values()]
        if order and free and (calls % 2 == 0 or not slot_of):  # admit one image every other step
            i = order.pop(0)
            loop.admit([free[0]], plans[i], seeds[i], [idx[i]])
            slot_of[i] = free[0]
        for slot in loop.step():
            i = next(k for k, v in slot_of.items() if v == slot)
            got[i] = loop.take([slot])[0]
            del slot_of[i]
        calls += 1

    for i in range(5):
        np.testing.assert_array_equal(got[i], sample(TanhModel(), plans[i], SHAPE, seeds[i], [idx[i]])[0])
    assert calls < sum(len(p) for p in plans)  # ε calls were shared


def test_two_plans_on_one_loop_one_after_the_other():
    loop = HostLoop(TanhModel(), SHAPE, 3)
    a, b = plan_for(DiffusionConfig(), "ddim", 5), plan_for(DiffusionConfig(), "unipc", 7)
    first, _ = loop.sample(a, 1, [0, 1, 2])
    loop.sample(b, 2, [0, 1])
    again, _ = loop.sample(a, 1, [0, 1, 2])

    np.testing.assert_array_equal(first, again)
    assert len(loop.slots.plans.plans) == 2  # the plans were added to the loop's table once each


def test_slots_refuse_misuse():
    loop = HostLoop(TanhModel(), SHAPE, 2)
    plan = plan_for(DiffusionConfig(), "ddim", 3)
    loop.admit([0], plan, 0, [0])
    with pytest.raises(ConfigError, match="occupied"):
        loop.admit([0], plan, 0, [1])
    with pytest.raises(ConfigError, match="still sampling"):
        loop.take([0])
    with pytest.raises(ConfigError, match="hold no image"):
        loop.take([1])
    with pytest.raises(ConfigError, match=r"slots must be distinct and in \[0, 2\)"):
        loop.admit([2], plan, 0, [1])


def test_a_stochastic_plan_draws_its_noise_per_image_seed_and_step():
    plan = plan_for(DiffusionConfig(), "sde-dpmsolver++", 6)
    a = sample(TanhModel(), plan, SHAPE, 1, [0])
    b = sample(TanhModel(), plan, SHAPE, 2, [0])
    det = sample(TanhModel(), plan_for(DiffusionConfig(), "dpmsolver++", 6), SHAPE, 1, [0])
    assert np.abs(a - b).max() > 0.01 and np.abs(a - det).max() > 0.01
