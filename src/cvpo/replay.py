"""N-step replay with discounted reward AND cost sums (Ray-free).

Rollout workers deliver episodes in chunks (an episode may span several
sampling calls). :class:`NStepAccumulator` stitches the chunks of each
episode together and emits an n-step transition for step ``t`` as soon as its
window ``t .. t+n-1`` is complete, or the episode has ended:

    R_t   = sum_{j<h} gamma**j * r_{t+j}
    C_t^k = sum_{j<h} gamma**j * c^k_{t+j}
    s'_t  = s_{t+h},   discount_t = gamma**h * (1 - terminated within the window)

with ``h = min(n, steps left in the episode)``: a window cut short by the end
of the episode bootstraps with the right power of gamma (from the final
observation if the episode was truncated, not at all if it terminated).

With ``next_actions=True`` each transition also carries ``a'_t = a_{t+h}``, the
action the behaviour policy took in ``s'_t`` (``next_actions``), and
``next_action_valid`` (1, or 0 where ``s'_t`` is the final observation of a
truncated or terminated episode, which has no action). A window is then emitted
one step later, once ``a_{t+n}`` is known. Cost critics bootstrapped on these
actions (``cost_target_actions="replay"``) estimate the behaviour's cost after
the first action, not the current policy's (docs/constraint.md).

The cost of the action taken in ``s_t`` is reported in the info returned by
that step, i.e. ``infos[t + 1]`` of an episode whose ``infos[0]`` is the reset
info. :class:`NStepReplayBuffer` is a fixed-capacity ring of such transitions
with uniform sampling and an exact ``get_state``/``set_state``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "NEXT_ACTION_KEYS",
    "TRANSITION_KEYS",
    "EpisodeChunk",
    "NStepAccumulator",
    "NStepReplayBuffer",
]

#: Columns of a sampled batch (and their meaning).
TRANSITION_KEYS = (
    "obs",  # (B, obs_dim) s_t
    "actions",  # (B, act_dim) a_t as executed (clipped to the action bounds)
    "rewards",  # (B,) discounted n-step reward sum R_t
    "costs",  # (B, m) discounted n-step cost sums C_t^k
    "next_obs",  # (B, obs_dim) s_{t+h}
    "discounts",  # (B,) gamma**h, or 0 where the episode terminated inside the window
)
#: Extra columns with ``NStepAccumulator(next_actions=True)``.
NEXT_ACTION_KEYS = (
    "next_actions",  # (B, act_dim) a_{t+h} as executed (zeros where not valid)
    "next_action_valid",  # (B,) 1.0 where s_{t+h} has an action, else 0.0
)


@dataclasses.dataclass
class EpisodeChunk:
    """One contiguous piece of an episode, in plain numpy.

    Attributes:
        episode_id: identifies the episode across chunks.
        observations: (L + 1, obs_dim); the first entry is the observation the
            chunk starts from (the reset observation, or the last observation of
            the previous chunk of the same episode).
        actions: (L, act_dim) actions taken.
        rewards: (L,) rewards of those actions.
        costs: (L, m) cost signals of those actions (from ``infos[1:]``).
        terminated: the episode ended in a terminal state at the chunk's end.
        truncated: the episode was cut by its time limit at the chunk's end.
    """

    episode_id: Any
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    costs: np.ndarray
    terminated: bool = False
    truncated: bool = False

    def __post_init__(self) -> None:
        n = len(self.actions)
        if len(self.observations) != n + 1 or len(self.rewards) != n or len(self.costs) != n:
            raise ValueError(
                f"episode chunk {self.episode_id!r}: expected L+1 observations and L actions, "
                f"rewards and costs; got {len(self.observations)} observations, {n} actions, "
                f"{len(self.rewards)} rewards, {len(self.costs)} costs"
            )

    @property
    def done(self) -> bool:
        return bool(self.terminated or self.truncated)


class _OpenEpisode:
    """Steps of one episode that have not all been emitted yet."""

    __slots__ = ("obs", "actions", "rewards", "costs", "first_step")

    def __init__(self, obs0: np.ndarray):
        self.obs = [obs0]  # list of (obs_dim,) and (k, obs_dim) pieces
        self.actions: list[np.ndarray] = []
        self.rewards: list[np.ndarray] = []
        self.costs: list[np.ndarray] = []
        self.first_step = 0


class NStepAccumulator:
    """Turns episode chunks into n-step transitions (see the module docstring).

    Args:
        n_step: window length n >= 1.
        gamma: discount in (0, 1).
        action_low, action_high: if given, stored actions are clipped to these
            bounds (the env executes clipped actions; the critic must see them).
        next_actions: also emit ``a_{t+h}`` and its validity (``NEXT_ACTION_KEYS``).
    """

    def __init__(
        self,
        n_step: int,
        gamma: float,
        action_low: np.ndarray | None = None,
        action_high: np.ndarray | None = None,
        next_actions: bool = False,
    ):
        if int(n_step) != n_step or n_step < 1:
            raise ValueError(f"n_step must be an integer >= 1, got {n_step!r}")
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1), got {gamma!r}")
        self.n_step = int(n_step)
        self.gamma = float(gamma)
        self.action_low = None if action_low is None else np.asarray(action_low, np.float32)
        self.action_high = None if action_high is None else np.asarray(action_high, np.float32)
        self.next_actions = bool(next_actions)
        self._keys = TRANSITION_KEYS + (NEXT_ACTION_KEYS if self.next_actions else ())
        self._open: dict[Any, _OpenEpisode] = {}
        # gamma ** j for j = 0 .. n
        self._powers = self.gamma ** np.arange(self.n_step + 1, dtype=np.float64)

    @property
    def num_open_episodes(self) -> int:
        return len(self._open)

    def add(self, chunks: Sequence[EpisodeChunk]) -> dict[str, np.ndarray] | None:
        """Adds chunks; returns the transitions that became complete (or None)."""
        out = [t for t in (self._add_one(c) for c in chunks) if t is not None]
        if not out:
            return None
        return {k: np.concatenate([t[k] for t in out], axis=0) for k in self._keys}

    def _add_one(self, chunk: EpisodeChunk) -> dict[str, np.ndarray] | None:
        ep = self._open.get(chunk.episode_id)
        if ep is None:
            ep = _OpenEpisode(np.asarray(chunk.observations[0], np.float32)[None])
            self._open[chunk.episode_id] = ep
        if len(chunk.actions):
            ep.obs.append(np.asarray(chunk.observations[1:], np.float32))
            actions = np.asarray(chunk.actions, np.float32)
            if self.action_low is not None:
                actions = np.clip(actions, self.action_low, self.action_high)
            ep.actions.append(actions)
            ep.rewards.append(np.asarray(chunk.rewards, np.float64))
            ep.costs.append(np.asarray(chunk.costs, np.float64).reshape(len(actions), -1))
        if chunk.done:
            del self._open[chunk.episode_id]
        return self._emit(ep, done=chunk.done, terminated=chunk.terminated)

    def _emit(self, ep: _OpenEpisode, *, done: bool, terminated: bool):
        if not ep.actions:
            return None
        obs = np.concatenate(ep.obs, axis=0)  # (T + 1, obs_dim), T steps held
        actions = np.concatenate(ep.actions, axis=0)  # (T, act_dim)
        rewards = np.concatenate(ep.rewards, axis=0)  # (T,)
        costs = np.concatenate(ep.costs, axis=0)  # (T, m)
        T, n = len(actions), self.n_step
        # steps whose window is complete (and, with next actions, whose a_{t+n} is
        # known); after the end every held step qualifies
        num = T if done else max(T - n + (0 if self.next_actions else 1), 0)
        if num > 0:
            t = np.arange(num)
            h = np.minimum(n, T - t)  # (num,) window lengths
            j = np.arange(n)
            idx = np.minimum(t[:, None] + j[None, :], T - 1)  # (num, n)
            mask = j[None, :] < h[:, None]  # (num, n)
            w = np.where(mask, self._powers[:n][None, :], 0.0)  # (num, n) gamma**j
            ret = (w * rewards[idx]).sum(axis=1)  # (num,)
            cost = np.einsum("tj,tjk->tk", w, costs[idx])  # (num, m)
            disc = self._powers[h]
            if done and terminated:
                # windows that reach the terminal state do not bootstrap
                disc = np.where(t + h >= T, 0.0, disc)
            batch = {
                "obs": obs[t],
                "actions": actions[t],
                "rewards": ret.astype(np.float32),
                "costs": cost.astype(np.float32),
                "next_obs": obs[t + h],
                "discounts": disc.astype(np.float32),
            }
            if self.next_actions:
                valid = t + h < T  # s_{t+h} is not the episode's final observation
                batch["next_actions"] = np.where(
                    valid[:, None], actions[np.minimum(t + h, T - 1)], 0.0
                ).astype(np.float32)
                batch["next_action_valid"] = valid.astype(np.float32)
        else:
            batch = None
        if not done:
            # keep only what later windows still need
            ep.obs = [obs[num:]]
            ep.actions = [actions[num:]]
            ep.rewards = [rewards[num:]]
            ep.costs = [costs[num:]]
            ep.first_step += num
        return batch


class NStepReplayBuffer:
    """Uniform replay of n-step transitions in a fixed-capacity ring.

    Args:
        capacity: the most transitions held; the oldest are overwritten.
        seed: seeds sampling.
    """

    def __init__(self, capacity: int, seed: int | None = None):
        if int(capacity) != capacity or capacity < 1:
            raise ValueError(f"replay capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = int(capacity)
        self._data: dict[str, np.ndarray] | None = None
        self._pos = 0
        self._size = 0
        self._num_added = 0
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self._size

    @property
    def num_added(self) -> int:
        """Transitions added over the buffer's lifetime."""
        return self._num_added

    def add(self, batch: dict[str, np.ndarray] | None) -> None:
        if not batch:
            return
        n = len(batch["obs"])
        if self._data is None:
            self._data = {
                k: np.zeros((self.capacity,) + v.shape[1:], dtype=v.dtype) for k, v in batch.items()
            }
        if n > self.capacity:  # only the newest fit
            batch = {k: v[-self.capacity :] for k, v in batch.items()}
            n = self.capacity
        idx = (self._pos + np.arange(n)) % self.capacity
        for k, v in batch.items():
            self._data[k][idx] = v
        self._pos = (self._pos + n) % self.capacity
        self._size = min(self._size + n, self.capacity)
        self._num_added += n

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = self._rng.integers(0, self._size, size=int(batch_size))
        return {k: v[idx] for k, v in self._data.items()}

    def nbytes(self) -> int:
        return 0 if self._data is None else int(sum(v.nbytes for v in self._data.values()))

    def get_state(self) -> dict[str, Any]:
        """Everything needed to continue sampling exactly where this buffer is."""
        data = None
        if self._data is not None:
            data = {k: v[: self._size].copy() for k, v in self._data.items()}
        return {
            "capacity": self.capacity,
            "pos": self._pos,
            "size": self._size,
            "num_added": self._num_added,
            "data": data,
            "rng": self._rng.bit_generator.state,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"replay state has capacity {state['capacity']}, this buffer {self.capacity}"
            )
        self._pos, self._size, self._num_added = state["pos"], state["size"], state["num_added"]
        self._data = None
        if state["data"] is not None:
            self._data = {
                k: np.zeros((self.capacity,) + v.shape[1:], dtype=v.dtype)
                for k, v in state["data"].items()
            }
            for k, v in state["data"].items():
                self._data[k][: self._size] = v
        self._rng.bit_generator.state = state["rng"]


def discounted_sum(x: Sequence[float], gamma: float) -> float:
    """sum_j gamma**j x_j (used by tests and examples)."""
    return float(sum(v * gamma**j for j, v in enumerate(x))) if len(x) else 0.0
