"""The constrained off-policy base of CVPO and SACLag: config keys and Algorithm.

Data flow of one ``training_step`` (the same for every subclass):

1. sample episode chunks from the EnvRunners (``rollout_fragment_length``
   steps per env); with remote runners and ``async_sampling``, collect the
   chunks that are done and start the next ones, which roll out during 2-4;
2. turn them into n-step transitions with discounted reward AND cost sums
   (:class:`cvpo.replay.NStepAccumulator`) and store them in the replay
   buffer; hand the chunks to :meth:`ConstrainedOffPolicy._on_chunks`, where a
   subclass follows the training episodes' costs (the per-step costs of each
   finished episode: :meth:`ConstrainedOffPolicy._finished_episode_costs`);
3. run the learner updates owed by ``training_intensity`` (updates per sampled
   env step), ``updates_per_learner_call`` minibatches per learner call;
4. sync the actor's weights back to the EnvRunners.

Also here: evaluation with a best feasible checkpoint, the clear errors of
``from_checkpoint``, and the driver's checkpoint state (update count, best
feasible return, the costs of unfinished episodes, optionally the replay
buffer). The checkpoint keys keep their ``cvpo_`` names for both algorithms.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_AGENT_STEPS_SAMPLED_LIFETIME,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    REPLAY_BUFFER_ADD_DATA_TIMER,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)

from cvpo.defaults import HIDDENS, STD_MAX, STD_MIN
from cvpo.envs import NoCostSignalError, NonFiniteSignalError
from cvpo.replay import EpisodeChunk, NStepAccumulator, NStepReplayBuffer
from rllib_ext.common import metrics as M

logger = logging.getLogger(__name__)

REPLAY_STATE_KEY = "cvpo_replay"
#: driver checkpoint keys (shared by CVPO and SACLag; the names predate SACLag)
NUM_UPDATES_STATE_KEY = "cvpo_num_updates"
BEST_FEASIBLE_STATE_KEY = "cvpo_best_feasible_return"
OPEN_EPISODE_COSTS_STATE_KEY = "cvpo_open_episode_costs"


class ConstrainedOffPolicyConfig(AlgorithmConfig):
    """Keys shared by CVPO and SACLag (constraint, networks, replay, sampling).

    Subclasses add their algorithm's keys and may change these defaults (the
    values here are CVPO's).
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        # --- constraint ---
        self.cost_limit: float | Sequence[float] = 25.0  # episodic, per constraint
        self.cost_keys: list[str] | None = None  # info keys; None -> ["cost"]
        self.episode_horizon: int | None = None  # None -> the env's time limit
        # --- networks and optimisation ---
        self.actor_hiddens = HIDDENS
        self.critic_hiddens = HIDDENS
        self.std_min = STD_MIN
        self.std_max = STD_MAX
        self.actor_lr = 5e-4
        self.critic_lr = 1e-3
        self.tau = 0.05  # polyak rate of the target networks
        self.n_step = 3
        self.gamma = 0.99
        self.num_reward_critics = 2
        self.reward_critic_reduction = "min"
        self.num_cost_critics = 1  # per constraint
        self.cost_critic_reduction = "mean"  # over each constraint's critics, in the actor's step
        # ... and in the cost critics' TD target. "max" with 2 critics is a pessimistic cost
        # estimate that compounds over the horizon: it kept the tiny task (gamma 0.95) under
        # its limit and made PointGoal1 (gamma 0.99) overestimate cost 12x (docs/constraint.md).
        self.cost_target_reduction = "mean"
        # "replay": the cost critics bootstrap on the action the behaviour took in s'
        # (SARSA-like), not on the target policy's samples, so the policy search cannot
        # pull the cost target down to the threshold (docs/constraint.md).
        self.cost_target_actions = "policy"
        self.train_batch_size_per_learner = 256
        self.training_intensity = 0.2  # gradient updates per sampled env step
        self.updates_per_learner_call = 8
        self.replay_capacity = 200_000
        self.num_steps_sampled_before_learning_starts = 2000
        self.store_buffer_in_checkpoints = False
        # --- speed ---
        # With remote EnvRunners, keep one sample request in flight per runner while
        # the learner updates (sampling and learning overlap; each update sees the data
        # up to the previous chunk). False: sample, then update, in lockstep.
        self.async_sampling = True
        # torch intra-op threads of a learner on CPU; None: all cores minus those of
        # the EnvRunners when the learner runs in the driver (num_learners=0),
        # else torch's default.
        self.learner_torch_threads = None
        # --- RLlib settings that fit an off-policy algorithm ---
        self.rollout_fragment_length = 50
        self.min_sample_timesteps_per_iteration = 1000
        self.min_time_s_per_iteration = 0
        # A failed EnvRunner sleeps this long before it exits and Ray restarts it; with
        # synchronous sampling every iteration waits for it (RLlib's 60 s default stalled a
        # crash iteration 77 s instead of 24 s here). The restart itself (~10-20 s of
        # imports) already throttles a crash-looping env.
        self.delay_between_env_runner_restarts_s = 1.0
        self.normalize_actions = False
        self.clip_actions = True
        self.lr = None
        # --- evaluation (RLlib's .evaluation(); off until evaluation_interval is set) ---
        # Evaluation EnvRunners act deterministically (the policy's mean action), as the
        # safe-RL papers evaluate; ``.evaluation(evaluation_config={"explore": True})``
        # evaluates the stochastic policy instead.
        self.evaluation_config = AlgorithmConfig.overrides(explore=False)
        # After each evaluation whose cost meets every limit and whose return beats the
        # best such evaluation so far, save a checkpoint to <trial dir>/best_feasible.
        self.keep_best_feasible_checkpoint = True
        from rllib_ext.common.callbacks import CostMetricsCallback

        self.callbacks_class = CostMetricsCallback

    @override(AlgorithmConfig)
    def training(
        self,
        *,
        cost_limit=NotProvided,
        cost_keys=NotProvided,
        episode_horizon=NotProvided,
        actor_hiddens=NotProvided,
        critic_hiddens=NotProvided,
        std_min=NotProvided,
        std_max=NotProvided,
        actor_lr=NotProvided,
        critic_lr=NotProvided,
        tau=NotProvided,
        n_step=NotProvided,
        num_reward_critics=NotProvided,
        reward_critic_reduction=NotProvided,
        num_cost_critics=NotProvided,
        cost_critic_reduction=NotProvided,
        cost_target_reduction=NotProvided,
        cost_target_actions=NotProvided,
        training_intensity=NotProvided,
        updates_per_learner_call=NotProvided,
        replay_capacity=NotProvided,
        num_steps_sampled_before_learning_starts=NotProvided,
        store_buffer_in_checkpoints=NotProvided,
        async_sampling=NotProvided,
        learner_torch_threads=NotProvided,
        keep_best_feasible_checkpoint=NotProvided,
        **kwargs,
    ) -> ConstrainedOffPolicyConfig:
        """Sets the shared hyper-parameters (any left out keep their value).

        Args:
            cost_limit: episodic cost limit C (a float, or one per constraint).
            cost_keys: the ``info`` keys of the cost signals (default ``["cost"]``,
                the sum of the task's cost terms).
            episode_horizon: T of the episodes; default: the env's time limit.
            actor_hiddens, critic_hiddens: hidden layer sizes.
            std_min, std_max: bounds of the actor's standard deviation.
            actor_lr, critic_lr: Adam learning rates.
            tau: polyak rate of the target networks.
            n_step: TD window length.
            num_reward_critics: E, the reward-critic ensemble size.
            reward_critic_reduction: "min" or "mean" over the reward ensemble.
            num_cost_critics: ensemble size per constraint.
            cost_critic_reduction: "mean" or "max" over each cost ensemble when the
                policy is improved (CVPO: the E-step).
            cost_target_reduction: "mean" or "max" over each cost ensemble in the
                cost critics' TD target.
            cost_target_actions: "policy" (the target policy's samples at s', the
                paper's), "replay" (the action the behaviour took at s', stored in
                the replay) or "mean" (the target policy's mean action at s': a cost
                critic of the deterministic policy, docs/constraint.md) as the next
                actions of the cost critics' TD target.
            training_intensity: gradient updates per sampled env step.
            updates_per_learner_call: minibatch updates per learner call.
            replay_capacity: transitions held by the replay buffer.
            num_steps_sampled_before_learning_starts: warm-up env steps.
            store_buffer_in_checkpoints: also save the replay buffer in checkpoints.
            async_sampling: with remote EnvRunners, sample the next chunk while the
                learner updates on the previous ones (default True).
            learner_torch_threads: torch threads of a CPU learner (None: auto).
            keep_best_feasible_checkpoint: with evaluation on, keep a checkpoint of
                the best evaluation return whose evaluation cost meets every limit
                (in ``<trial dir>/best_feasible``).
        """
        super().training(**kwargs)
        for name, value in list(locals().items()):
            if name in ("self", "kwargs", "__class__") or value is NotProvided:
                continue
            setattr(self, name, value)
        return self

    # -- derived values -----------------------------------------------------------------
    @property
    def constraint_names(self) -> list[str]:
        from cvpo.constraints import constraint_names

        return constraint_names(self.cost_keys)

    @property
    def cost_limits(self) -> list[float]:
        """One limit per constraint (cvpo.constraints.cost_limits)."""
        from cvpo.constraints import cost_limits

        return cost_limits(self.cost_limit, self.constraint_names)

    @property
    @override(AlgorithmConfig)
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {
            "actor_hiddens": tuple(self.actor_hiddens),
            "critic_hiddens": tuple(self.critic_hiddens),
            "num_reward_critics": self.num_reward_critics,
            "num_constraints": len(self.constraint_names),
            "num_cost_critics": self.num_cost_critics,
            "std_min": self.std_min,
            "std_max": self.std_max,
        }


def episode_to_chunk(episode, cost_keys: Sequence[str]) -> EpisodeChunk:
    """Converts an RLlib SingleAgentEpisode (chunk) to plain numpy.

    The cost of the action taken at step t arrives in ``infos[t + 1]`` (the
    info returned by that ``env.step``), not in ``infos[t]``.
    """
    infos = episode.get_infos()
    try:
        costs = [[float(info[k]) for k in cost_keys] for info in infos[1:]]
    except KeyError as err:
        raise ValueError(
            f"the env's step info has no cost key {err.args[0]!r} (keys seen: "
            f"{sorted(infos[-1]) if infos else []}); set the config's .training(cost_keys=...) "
            "(CVPOConfig, SACLagConfig) to keys the env reports, or wrap the env so "
            "info['cost'] is set each step"
        ) from None
    return EpisodeChunk(
        episode_id=episode.id_,
        observations=np.asarray(episode.get_observations(), np.float32).reshape(
            len(episode) + 1, -1
        ),
        actions=np.asarray(episode.get_actions(), np.float32).reshape(len(episode), -1),
        rewards=np.asarray(episode.get_rewards(), np.float64),
        costs=np.asarray(costs, np.float64).reshape(len(episode), len(cost_keys)),
        terminated=bool(episode.is_terminated),
        truncated=bool(episode.is_truncated),
    )


_SAMPLE_TAG = "cvpo_sample"
_POLL_S = 0.01  # seconds between checks for finished sample requests
_UNHEALTHY_WAIT_S = 0.2  # pause when every remote EnvRunner is down


def _sample_with_metrics(env_runner):
    """Runs on a remote EnvRunner: one chunk of episodes and the runner's metrics."""
    return env_runner.sample(), env_runner.get_metrics()


class ConstrainedOffPolicy(Algorithm):
    """Sampling, n-step cost replay, updates, evaluation and checkpoints of CVPO and SACLag.

    Subclasses implement :meth:`_setup_constraint_state` (their driver-side
    constraint state, built with the replay buffer), :meth:`_on_chunks` (what
    they do with each iteration's episode chunks), and extend
    :meth:`get_state` / :meth:`set_state` for that state.
    """

    #: whether :meth:`_finished_episode_costs` keeps the per-step costs of open episodes
    _tracks_episode_costs: bool = True

    @override(Algorithm)
    def setup(self, config) -> None:
        # The EnvRunners look the env id up in this Ray session's registry: a ray.init()
        # after an earlier ray.shutdown() in the same process starts without the ids that
        # `import rllib_ext` registered, so register them (again) first.
        from rllib_ext.envs import register_all

        register_all()
        super().setup(config)

    @classmethod
    @override(Algorithm)
    def from_checkpoint(cls, path, filesystem=None, **kwargs):
        """Like ``Algorithm.from_checkpoint``, with one clear error (CheckpointError)
        for a local checkpoint that is missing, damaged, or another algorithm's."""
        if filesystem is None:
            from rllib_ext.checkpoints import absolute_checkpoint_path, check_algorithm_checkpoint

            check_algorithm_checkpoint(path, cls)
            path = absolute_checkpoint_path(path)  # pyarrow fails on relative paths
        return super().from_checkpoint(path, filesystem=filesystem, **kwargs)

    @override(Algorithm)
    def _create_local_replay_buffer_if_necessary(self, config):
        # Our own buffer: n-step sums of reward and of every cost (RLlib's
        # episode buffers keep only the window's first and last infos).
        space = config.action_space
        if space is None:  # filled by validate() from the env
            raise ValueError(
                f"{type(config).__name__}.action_space is unknown: call validate() first"
            )
        self._accumulator = NStepAccumulator(
            config.n_step,
            config.gamma,
            action_low=space.low,
            action_high=space.high,
            next_actions=config.cost_target_actions == "replay",
        )
        self._replay = NStepReplayBuffer(config.replay_capacity, seed=config.seed)
        self._num_updates = 0
        self._best_feasible_return = -np.inf
        self._open_episode_costs: dict[str, list[np.ndarray]] = {}  # episode id -> cost chunks
        self._setup_constraint_state(config)
        return None

    def _setup_constraint_state(self, config) -> None:
        """Builds the subclass's driver-side constraint state (called once, early)."""

    # -- sampling -------------------------------------------------------------------------
    def _uses_async_sampling(self) -> bool:
        return bool(self.config.async_sampling) and self.env_runner_group.num_remote_workers() > 0

    def _sample_sync(self):
        try:
            return synchronous_parallel_sample(
                worker_set=self.env_runner_group,
                concat=True,
                sample_timeout_s=self.config.sample_timeout_s,
                _uses_new_env_runners=True,
                _return_metrics=True,
            )
        except RuntimeError as err:
            # The local EnvRunner wraps a failed env.step in a bare RuntimeError();
            # surface cvpo.envs' own one-line error (it names the env and the step).
            if isinstance(err.__cause__, (NonFiniteSignalError, NoCostSignalError)):
                raise err.__cause__ from None
            raise

    def _sample_async(self):
        """Collects the chunks that remote EnvRunners finished and re-launches them.

        Every healthy runner has one ``sample`` request in flight (RLlib's
        ``max_requests_in_flight_per_env_runner``, default 1), so it rolls out the
        next chunk while this process runs the learner updates. Waits (polling,
        up to ``sample_timeout_s``) until at least one chunk is back, so an
        iteration never spins without data. A runner that fails is marked
        unhealthy by RLlib's actor manager and restored by ``Algorithm.step``.
        """
        group = self.env_runner_group
        timeout = self.config.sample_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        results = group.foreach_env_runner_async_fetch_ready(
            func=_sample_with_metrics, tag=_SAMPLE_TAG, timeout_seconds=0.0
        )
        while not results:
            if deadline is not None and time.monotonic() > deadline:
                break
            if group.num_healthy_remote_workers() == 0:
                # nothing can come back until the training loop restores runners;
                # don't spin while they restart
                time.sleep(_UNHEALTHY_WAIT_S)
                break
            results = group.foreach_env_runner_async_fetch_ready(
                func=_sample_with_metrics, tag=_SAMPLE_TAG, timeout_seconds=_POLL_S
            )
        episodes = [episode for chunk, _ in results for episode in chunk]
        return episodes, [metrics for _, metrics in results]

    @override(Algorithm)
    def training_step(self) -> None:
        cfg = self.config
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            if self._uses_async_sampling():
                episodes, env_runner_results = self._sample_async()
            else:
                episodes, env_runner_results = self._sample_sync()
        self.metrics.aggregate(env_runner_results, key=ENV_RUNNER_RESULTS)

        with self.metrics.log_time((TIMERS, REPLAY_BUFFER_ADD_DATA_TIMER)):
            names = cfg.constraint_names
            chunks = [episode_to_chunk(e, names) for e in episodes]
            self._replay.add(self._accumulator.add(chunks))
        self._on_chunks(chunks)
        if np.isfinite(self._best_feasible_return):
            self.metrics.log_value(
                (M.CVPO_RESULTS, M.BEST_FEASIBLE_RETURN), self._best_feasible_return, window=1
            )

        sampled = self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)
        self.metrics.log_value((M.CVPO_RESULTS, M.REPLAY_SIZE), len(self._replay), window=1)
        warmup = cfg.num_steps_sampled_before_learning_starts
        if sampled < warmup or len(self._replay) < cfg.train_batch_size_per_learner:
            self.metrics.log_value(
                (M.CVPO_RESULTS, M.UPDATES_LIFETIME), self._num_updates, window=1
            )
            return
        owed = int(cfg.training_intensity * (sampled - warmup)) + 1 - self._num_updates
        B = cfg.train_batch_size_per_learner
        timesteps = {
            NUM_ENV_STEPS_SAMPLED_LIFETIME: sampled,
            NUM_AGENT_STEPS_SAMPLED_LIFETIME: sampled,
        }
        did_update = False
        while owed > 0:
            u = min(owed, cfg.updates_per_learner_call)
            batch = self._replay.sample(u * B)
            train_batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(batch)}, env_steps=u * B)
            with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
                learner_results = self.learner_group.update(
                    batch=train_batch,
                    timesteps=timesteps,
                    minibatch_size=B,
                    num_epochs=1,
                )
            self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
            self._num_updates += u
            owed -= u
            did_update = True
        self.metrics.log_value((M.CVPO_RESULTS, M.UPDATES_LIFETIME), self._num_updates, window=1)

        if did_update:
            with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
                self.env_runner_group.sync_weights(
                    from_worker_or_learner_group=self.learner_group,
                    policies=[DEFAULT_MODULE_ID],
                    inference_only=True,
                )

    # -- the training episodes' costs ------------------------------------------------------
    def _on_chunks(self, chunks: Sequence[EpisodeChunk]) -> None:
        """Called with each training step's episode chunks (after they entered the replay)."""

    def _finished_episode_costs(
        self, chunks: Sequence[EpisodeChunk]
    ) -> list[tuple[np.ndarray, bool]]:
        """Collects each training episode's per-step costs over its chunks; returns
        (costs (T, m), truncated and not terminated) of the episodes that ended, in
        the order their last chunks came. Does nothing while
        ``_tracks_episode_costs`` is False."""
        finished = []
        for c in chunks if self._tracks_episode_costs else ():
            parts = self._open_episode_costs.pop(c.episode_id, [])
            parts.append(c.costs)
            if c.terminated or c.truncated:
                finished.append((np.concatenate(parts), c.truncated and not c.terminated))
            else:
                self._open_episode_costs[c.episode_id] = parts
        return finished

    # -- evaluation ----------------------------------------------------------------------
    @override(Algorithm)
    def evaluate(self, *args, **kwargs):
        results = super().evaluate(*args, **kwargs)
        if self.config.keep_best_feasible_checkpoint:
            self._maybe_save_best_feasible(results.get(ENV_RUNNER_RESULTS) or {})
        return results

    def _evaluation_feasible(self, eval_runner_results: dict[str, Any]) -> bool | None:
        """Whether the evaluation's mean episode cost meets every limit (None: no episode)."""
        names = self.config.constraint_names
        if len(names) == 1:
            keys = [M.EPISODE_COST_MEAN]
        else:
            keys = [M.EPISODE_COST_MEAN_PREFIX + k for k in names]
        costs = [eval_runner_results.get(k) for k in keys]
        if any(c is None or not np.isfinite(c) for c in costs):
            return None
        return all(float(c) <= limit for c, limit in zip(costs, self.config.cost_limits))

    #: set to a folder to put the best feasible checkpoint there instead
    best_feasible_path: str | None = None

    def best_feasible_checkpoint_dir(self) -> str:
        """Where the best feasible checkpoint goes: ``best_feasible_path`` if set, else
        ``best_feasible`` in the trial folder under Tune, or in the logdir without Tune."""
        from rllib_ext.checkpoints import best_feasible_target

        return best_feasible_target(self)[0]

    def _maybe_save_best_feasible(self, eval_runner_results: dict[str, Any]) -> None:
        ret = eval_runner_results.get(M.EPISODE_RETURN_MEAN)
        if (
            ret is None
            or not np.isfinite(ret)
            or not self._evaluation_feasible(eval_runner_results)
        ):
            return
        if ret <= self._best_feasible_return:
            return
        from rllib_ext.checkpoints import best_feasible_target

        self._best_feasible_return = float(ret)
        path, fs = best_feasible_target(self)
        self.save_to_path(path, filesystem=fs)
        logger.info("best feasible evaluation return %.3f: checkpoint %s", ret, path)

    # -- checkpoints ---------------------------------------------------------------------
    @override(Algorithm)
    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state[NUM_UPDATES_STATE_KEY] = self._num_updates
        state[BEST_FEASIBLE_STATE_KEY] = self._best_feasible_return
        state[OPEN_EPISODE_COSTS_STATE_KEY] = {
            k: [c.tolist() for c in parts] for k, parts in self._open_episode_costs.items()
        }
        if self.config.store_buffer_in_checkpoints:
            state[REPLAY_STATE_KEY] = self._replay.get_state()
        return state

    @override(Algorithm)
    def set_state(self, state) -> None:
        super().set_state(state)
        if NUM_UPDATES_STATE_KEY in state:
            self._num_updates = int(state[NUM_UPDATES_STATE_KEY])
        if BEST_FEASIBLE_STATE_KEY in state:
            self._best_feasible_return = float(state[BEST_FEASIBLE_STATE_KEY])
        if OPEN_EPISODE_COSTS_STATE_KEY in state:
            self._open_episode_costs = {
                k: [np.asarray(c, np.float64) for c in parts]
                for k, parts in state[OPEN_EPISODE_COSTS_STATE_KEY].items()
            }
        if REPLAY_STATE_KEY in state:
            data = state[REPLAY_STATE_KEY].get("data") or {}
            if self._accumulator.next_actions and data and "next_actions" not in data:
                raise ValueError(
                    "this checkpoint's replay buffer holds no next actions (it was written "
                    "with cost_target_actions='policy'); restore it with "
                    "cost_target_actions='policy', or start a new run for 'replay'"
                )
            self._replay.set_state(state[REPLAY_STATE_KEY])
