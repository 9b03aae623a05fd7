"""N-step accumulation with costs, chunked episodes, and buffer state."""

import numpy as np
import pytest

from cvpo.replay import EpisodeChunk, NStepAccumulator, NStepReplayBuffer, discounted_sum


def _episode(T, m=2, seed=0):
    rng = np.random.default_rng(seed)
    obs = np.arange(T + 1, dtype=np.float32)[:, None].repeat(3, axis=1)
    act = rng.normal(size=(T, 2)).astype(np.float32)
    rew = rng.normal(size=T)
    cost = rng.integers(0, 2, size=(T, m)).astype(np.float64)
    return obs, act, rew, cost


def _chunks(obs, act, rew, cost, cuts, terminated, eid="e"):
    out, start = [], 0
    T = len(act)
    for _i, end in enumerate(list(cuts) + [T]):
        last = end == T
        out.append(
            EpisodeChunk(
                eid,
                obs[start : end + 1],
                act[start:end],
                rew[start:end],
                cost[start:end],
                terminated=terminated and last,
                truncated=(not terminated) and last,
            )
        )
        start = end
    return out


@pytest.mark.parametrize("terminated", [True, False])
@pytest.mark.parametrize("cuts", [[], [1], [3, 4, 9], [2, 5, 6, 7, 8]])
def test_nstep_sums_match_definition_across_chunks(terminated, cuts):
    T, n, gamma = 11, 3, 0.9
    obs, act, rew, cost = _episode(T)
    acc = NStepAccumulator(n, gamma, action_low=-np.ones(2), action_high=np.ones(2))
    got = []
    for c in _chunks(obs, act, rew, cost, cuts, terminated):
        b = acc.add([c])
        if b is not None:
            got.append(b)
    batch = {k: np.concatenate([g[k] for g in got]) for k in got[0]}
    assert len(batch["obs"]) == T
    assert acc.num_open_episodes == 0
    order = np.argsort(batch["obs"][:, 0])
    for i, t in enumerate(order):
        h = min(n, T - i)
        assert batch["obs"][t, 0] == i
        assert batch["next_obs"][t, 0] == i + h
        np.testing.assert_allclose(
            batch["rewards"][t], discounted_sum(rew[i : i + h], gamma), rtol=1e-6
        )
        for k in range(2):
            np.testing.assert_allclose(
                batch["costs"][t, k], discounted_sum(cost[i : i + h, k], gamma), rtol=1e-6
            )
        expected_disc = 0.0 if (terminated and i + h == T) else gamma**h
        np.testing.assert_allclose(batch["discounts"][t], expected_disc, rtol=1e-6)
        np.testing.assert_array_equal(batch["actions"][t], np.clip(act[i], -1, 1))


def test_transitions_emitted_as_soon_as_window_complete():
    obs, act, rew, cost = _episode(10, m=1)
    acc = NStepAccumulator(3, 0.99)
    b = acc.add([EpisodeChunk("x", obs[:6], act[:5], rew[:5], cost[:5])])
    assert len(b["obs"]) == 3  # steps 0, 1, 2 have full windows of 3
    b = acc.add([EpisodeChunk("x", obs[5:7], act[5:6], rew[5:6], cost[5:6])])
    assert len(b["obs"]) == 1 and b["obs"][0, 0] == 3


def test_interleaved_episodes_do_not_mix():
    o1, a1, r1, c1 = _episode(4, m=1, seed=1)
    o2, a2, r2, c2 = _episode(4, m=1, seed=2)
    o2 = o2 + 100
    acc = NStepAccumulator(1, 0.5)
    b = acc.add(
        _chunks(o1, a1, r1, c1, [2], False, "a")[:1] + _chunks(o2, a2, r2, c2, [2], False, "b")[:1]
    )
    assert sorted(b["obs"][:, 0].tolist()) == [0, 1, 100, 101]
    np.testing.assert_array_equal(b["next_obs"][:, 0] - b["obs"][:, 0], 1)


def test_bad_chunk_and_arguments():
    with pytest.raises(ValueError, match="L\\+1 observations"):
        EpisodeChunk("e", np.zeros((3, 1)), np.zeros((3, 1)), np.zeros(3), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="n_step"):
        NStepAccumulator(0, 0.9)
    with pytest.raises(ValueError, match="gamma"):
        NStepAccumulator(1, 1.0)
    with pytest.raises(ValueError, match="capacity"):
        NStepReplayBuffer(0)


def test_ring_buffer_overwrites_oldest_and_state_round_trip():
    buf = NStepReplayBuffer(5, seed=3)
    for i in range(8):
        buf.add({"obs": np.full((1, 2), i, np.float32), "rewards": np.array([i], np.float32)})
    assert len(buf) == 5 and buf.num_added == 8
    assert set(buf.sample(200)["obs"][:, 0].tolist()) == {3.0, 4.0, 5.0, 6.0, 7.0}
    state = buf.get_state()
    other = NStepReplayBuffer(5)
    other.set_state(state)
    np.testing.assert_array_equal(buf.sample(50)["rewards"], other.sample(50)["rewards"])
    with pytest.raises(ValueError, match="capacity"):
        NStepReplayBuffer(6).set_state(state)


@pytest.mark.parametrize("terminated", [True, False])
@pytest.mark.parametrize("cuts", [[], [1], [3, 4, 9], [2, 5, 6, 7, 8]])
def test_next_actions_are_the_behaviours_action_at_the_next_observation(terminated, cuts):
    """next_actions=True: a'_t = a_{t+h} (valid) except where s_{t+h} ends the episode;
    the other columns equal the plain accumulator's, whatever the chunking."""
    T, n, gamma = 11, 3, 0.9
    obs, act, rew, cost = _episode(T)
    plain, with_next = NStepAccumulator(n, gamma), NStepAccumulator(n, gamma, next_actions=True)
    got_plain, got = [], []
    for c in _chunks(obs, act, rew, cost, cuts, terminated):
        got_plain += [b for b in [plain.add([c])] if b is not None]
        b = with_next.add([c])
        if b is not None:
            got.append(b)
    a = {k: np.concatenate([g[k] for g in got_plain]) for k in got_plain[0]}
    b = {k: np.concatenate([g[k] for g in got]) for k in got[0]}
    assert set(b) == set(a) | {"next_actions", "next_action_valid"}
    oa, ob = np.argsort(a["obs"][:, 0]), np.argsort(b["obs"][:, 0])
    for k in a:
        np.testing.assert_array_equal(a[k][oa], b[k][ob])
    for i, t in enumerate(ob):
        h = min(n, T - i)
        if i + h < T:
            assert b["next_action_valid"][t] == 1.0
            np.testing.assert_array_equal(b["next_actions"][t], act[i + h])
        else:  # s_{t+h} is the final observation: no action was taken there
            assert b["next_action_valid"][t] == 0.0
            np.testing.assert_array_equal(b["next_actions"][t], 0.0)
    assert with_next.num_open_episodes == 0


def test_next_actions_wait_one_step_for_the_action_at_the_window_end():
    obs, act, rew, cost = _episode(10, m=1)
    acc = NStepAccumulator(3, 0.99, next_actions=True)
    b = acc.add([EpisodeChunk("x", obs[:6], act[:5], rew[:5], cost[:5])])
    # windows of steps 0..2 are complete, but a_5 (s' of step 2) is not known yet
    assert b["obs"][:, 0].tolist() == [0.0, 1.0]
    np.testing.assert_array_equal(b["next_actions"], act[3:5])
    b = acc.add([EpisodeChunk("x", obs[5:7], act[5:6], rew[5:6], cost[5:6])])
    assert b["obs"][:, 0].tolist() == [2.0]
    np.testing.assert_array_equal(b["next_actions"][0], act[5])
