"""Faults during training: EnvRunner crashes, non-finite env signals, NaN losses,
and a failing E-step solver."""

from __future__ import annotations

import math

import faulty_envs
import numpy as np
import pytest
import torch

from rllib_ext.common import metrics as M

MID = "default_policy"


def fast_config(env, **training):
    """The tiny config (conftest) with updates from the first 150-step iteration."""
    from conftest import make_tiny_config

    kw = dict(num_steps_sampled_before_learning_starts=100, train_batch_size_per_learner=32)
    cfg = make_tiny_config(env=env, **(kw | training))
    cfg.min_sample_timesteps_per_iteration = 150
    return cfg


# -- 1. EnvRunner crashes -------------------------------------------------------------------
def test_env_runner_crashes_are_restarted_and_no_iteration_is_lost(ray_local, tmp_path):
    n_iters = 3
    cfg = fast_config(faulty_envs.CRASH_ONCE_ID)
    # Runner 1 crashes once, at a seeded step in its first 60; runner 2 keeps sampling.
    # (Crashing both works too, but their restart doubles the actor start-up cost:
    # 55-63 s for this test on 2 loaded cores instead of 40-50 s.)
    cfg.environment(
        env_config={
            "crash_dir": str(tmp_path),
            "crash_seed": 7,
            "crash_window": (10, 60),
            "crash_runners": [1],
        }
    )
    cfg.env_runners(num_env_runners=2, rollout_fragment_length=25)
    assert cfg.restart_failed_env_runners  # RLlib's default, kept by CVPOConfig
    # RLlib sleeps this long in a failed runner before it exits (default 60 s)
    cfg.fault_tolerance(delay_between_env_runner_restarts_s=0.5)
    algo = cfg.build_algo()
    results = []
    try:
        # at least n_iters; on a loaded machine the crash (and so the restart, which
        # RLlib does at the start of the next iteration) can come later: up to 8
        while len(results) < 8:
            results.append(algo.train())
            restarts = results[-1]["fault_tolerance"]["num_remote_worker_restarts"]
            if len(results) >= n_iters and restarts >= 1:
                break
    finally:
        algo.stop()
    n_iters = len(results)

    crashed = sorted(p.name for p in tmp_path.glob("*.crashed"))
    assert crashed == ["runner1.crashed"]
    ft = results[-1]["fault_tolerance"]
    # restarted exactly once: the restarted runner found its marker and did not crash again
    assert ft["num_remote_worker_restarts"] == 1, ft
    assert ft["num_healthy_workers"] == 2, ft
    # every iteration is reported exactly once and in order
    assert [r["training_iteration"] for r in results] == list(range(1, n_iters + 1))
    steps = [r["env_runners"]["num_env_steps_sampled_lifetime"] for r in results]
    assert all(b > a for a, b in zip(steps, steps[1:])), steps
    assert all(r["env_runners"]["num_env_steps_sampled"] > 0 for r in results)
    # the driver's update schedule is intact after the restarts
    sampled = steps[-1]
    assert results[-1][M.CVPO_RESULTS][M.UPDATES_LIFETIME] == int(0.1 * (sampled - 100)) + 1


# -- 3a. non-finite reward/cost from an env --------------------------------------------------
NONFINITE_ENV = faulty_envs.MODULE_PREFIX + faulty_envs.NONFINITE_ID


def _chain(err, limit: int = 50):
    """err, its cause/context, theirs, ...: each object once (re-raising a cause
    ``from None`` makes a cycle) and to a bounded depth (Ray's wrapped task errors
    can produce a fresh cause object on every access)."""
    seen = []  # the objects themselves, kept alive so identity checks are exact
    for _ in range(limit):
        if err is None or any(err is e for e in seen):
            return
        seen.append(err)
        yield err
        err = err.__cause__ or err.__context__


@pytest.mark.parametrize(
    "signal,value", [("reward", math.nan), ("cost", math.inf)], ids=["nan-reward", "inf-cost"]
)
def test_make_env_raises_naming_env_and_step(signal, value):
    from cvpo.envs import NonFiniteSignalError, make_env

    env = make_env(NONFINITE_ENV, bad_step=3, signal=signal, value=value)
    env.reset(seed=0)
    for _ in range(3):
        env.step(env.action_space.sample())
    with pytest.raises(NonFiniteSignalError) as info:
        env.step(env.action_space.sample())
    msg = str(info.value)
    assert faulty_envs.NONFINITE_ID in msg and "step 3" in msg and signal in msg, msg
    assert info.value.step == 3 and info.value.signals == (signal,)


def test_nonfinite_reward_surfaces_from_train_naming_env_and_step(ray_local):
    from cvpo.envs import NonFiniteSignalError

    cfg = fast_config(NONFINITE_ENV)
    cfg.environment(env_config={"bad_step": 7})
    algo = cfg.build_algo()
    try:
        with pytest.raises(Exception) as info:  # noqa: B017 (checked below)
            algo.train()
    finally:
        algo.stop()
    errors = [e for e in _chain(info.value) if isinstance(e, NonFiniteSignalError)]
    assert errors, f"no NonFiniteSignalError in {[type(e).__name__ for e in _chain(info.value)]}"
    msg = str(errors[0])
    assert faulty_envs.NONFINITE_ID in msg and "step 7" in msg and "reward=nan" in msg, msg


def test_nonfinite_drop_keeps_training_and_counts(ray_local):
    cfg = fast_config(NONFINITE_ENV)
    cfg.environment(env_config={"bad_step": 7, "signal": "cost", "on_nonfinite": "drop"})
    algo = cfg.build_algo()
    try:
        with pytest.warns(RuntimeWarning, match="non-finite cost"):
            r1 = algo.train()
        r2 = algo.train()
    finally:
        algo.stop()
    assert r2["training_iteration"] == 2
    for r in (r1, r2):
        assert r["env_runners"][M.NUM_NONFINITE_DROPPED] > 0
        assert np.isfinite(r["env_runners"][M.EPISODE_COST_MEAN])
    assert r2[M.CVPO_RESULTS][M.UPDATES_LIFETIME] > 0
    assert float(_peek(r2["learners"][MID][M.NUM_SKIPPED_UPDATES])) == 0


# -- 3b. a NaN in the critics never reaches the actor ----------------------------------------
def _peek(v):
    return float(getattr(v, "peek", lambda: v)())


def build_bare_learner(**training):
    """The real CVPO learner without Ray, EnvRunners or an env (see benchmarks/learner.py)."""
    import gymnasium as gym

    from rllib_ext.cvpo import CVPOConfig

    obs_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    kw = dict(
        train_batch_size_per_learner=32,
        num_sampled_actions=8,
        actor_hiddens=[16, 16],
        critic_hiddens=[16, 16],
        updates_per_learner_call=1,
        episode_horizon=100,
    )
    kw.update(training)
    config = (
        CVPOConfig().environment(observation_space=obs_space, action_space=act_space).training(**kw)
    )
    config.seed = 0
    spaces = {"__env__": (obs_space, act_space), MID: (obs_space, act_space)}
    return config.build_learner(env=None, spaces=spaces)


def _batch(n=32, seed=0, **override):
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    rng = np.random.default_rng(seed)
    data = {
        "obs": rng.normal(size=(n, 4)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "costs": rng.integers(0, 2, size=(n, 1)).astype(np.float32),
        "next_obs": rng.normal(size=(n, 4)).astype(np.float32),
        "discounts": np.full(n, 0.99**3, np.float32),
    }
    for k, fn in override.items():
        data[k] = fn(data[k])
    return MultiAgentBatch({MID: SampleBatch(data)}, env_steps=n)


def _update(learner, batch, minibatch_size=32):
    return learner.update(
        batch=batch,
        minibatch_size=minibatch_size,
        num_epochs=1,
        timesteps={"num_env_steps_sampled_lifetime": 1000},
    )


def _snapshot(learner):
    module = learner.module[MID]
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    optims = {
        name: {
            i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
            for i, s in learner.get_optimizer(MID, name).state.items()
        }
        for name in ("actor", "critic")
    }
    return weights, optims


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _set_nan(col, idx=3):
    def f(x):
        x = x.copy()
        x.reshape(len(x), -1)[idx, 0] = np.nan
        return x

    return f


@pytest.mark.parametrize("column", ["rewards", "costs", "next_obs", "obs"])
def test_nan_batch_skips_update_and_leaves_weights_untouched(column):
    learner = build_bare_learner()
    _update(learner, _batch(seed=1))  # a normal first update: optimizer moments exist
    w0, opt0 = _snapshot(learner)
    cvpo0 = learner.get_cvpo_state()[MID]
    assert any(k.startswith("actor") for k in w0) and any(k.startswith("critic") for k in w0), (
        sorted(w0)
    )

    res = _update(learner, _batch(seed=2, **{column: _set_nan(column)}))
    w1, opt1 = _snapshot(learner)
    assert _same(w0, w1), [
        k for k in w0 if not torch.equal(w0[k], w1[k])
    ]  # actor, critics, targets
    for name in opt0:
        for i in opt0[name]:
            assert _same(opt0[name][i], opt1[name][i]), name
    assert _peek(res[MID][M.NUM_SKIPPED_UPDATES]) == 1
    cvpo1 = learner.get_cvpo_state()[MID]
    assert cvpo1["counters"] == {"updates": cvpo0["counters"]["updates"], "skipped": 1}
    assert cvpo1["dual"][0] == cvpo0["dual"][0]  # eta not taken from the bad update
    for k, v in cvpo0["trust_region"].items():
        assert np.array_equal(np.asarray(cvpo1["trust_region"][k]), np.asarray(v)), k

    # a finite batch updates again
    res = _update(learner, _batch(seed=3))
    w2, _ = _snapshot(learner)
    changed = [k for k in w1 if not torch.equal(w1[k], w2[k])]
    assert any(k.startswith("actor") for k in changed) and any(
        k.startswith("critic") for k in changed
    )
    assert _peek(res[MID][M.NUM_SKIPPED_UPDATES]) == 1  # lifetime count, unchanged
    assert learner.get_cvpo_state()[MID]["counters"]["updates"] == cvpo0["counters"]["updates"] + 1


# -- 3c. the E-step falls back when the solver fails ---------------------------------------
def test_estep_solver_failure_falls_back_and_training_continues(monkeypatch):
    import cvxpy as cp

    calls = []

    def broken_solve(self, *args, **kwargs):
        calls.append(1)
        raise cp.error.SolverError("injected solver failure")

    monkeypatch.setattr(cp.Problem, "solve", broken_solve)
    learner = build_bare_learner(
        estep_solver="cvxpy", train_batch_size_per_learner=16, num_sampled_actions=4
    )
    w0, _ = _snapshot(learner)
    for seed in (1, 2):
        pol = _update(learner, _batch(n=16, seed=seed), minibatch_size=16)[MID]
        assert _peek(pol[M.ESTEP_FALLBACKS]) > 0
        assert _peek(pol[M.NUM_SKIPPED_UPDATES]) == 0
        assert np.isfinite(_peek(pol[M.ETA])) and _peek(pol[M.ETA]) > 0
    assert len(calls) == 2  # cvxpy was really asked, and failed, each time
    w1, _ = _snapshot(learner)
    assert not _same(w0, w1)  # updates were applied with the Newton solution
    assert learner.get_cvpo_state()[MID]["counters"] == {"updates": 2, "skipped": 0}
