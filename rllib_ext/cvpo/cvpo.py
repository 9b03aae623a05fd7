"""CVPO on RLlib's new API stack: the config and the off-policy Algorithm.

Data flow of one ``training_step``:

1. sample episode chunks from the EnvRunners (``rollout_fragment_length``
   steps per env); with remote runners and ``async_sampling``, collect the
   chunks that are done and start the next ones, which roll out during 2-4;
2. turn them into n-step transitions with discounted reward AND cost sums
   (:class:`cvpo.replay.NStepAccumulator`) and store them in the replay
   buffer;
3. run the learner updates owed by ``training_intensity`` (updates per sampled
   env step), ``updates_per_learner_call`` minibatches per learner call;
4. sync the actor's weights back to the EnvRunners.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
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

from cvpo.envs import NoCostSignalError, NonFiniteSignalError
from cvpo.replay import EpisodeChunk, NStepAccumulator, NStepReplayBuffer
from rllib_ext.cvpo import metrics as M

logger = logging.getLogger(__name__)

ESTEP_SOLVERS = ("newton", "cvxpy")
REWARD_REDUCTIONS = ("min", "mean")
COST_REDUCTIONS = ("mean", "max")
REPLAY_STATE_KEY = "cvpo_replay"


class CVPOConfig(AlgorithmConfig):
    """Configuration of CVPO (builder style).

    Example::

        config = (
            CVPOConfig()
            .environment("SafetyPointGoal1-v0")
            .env_runners(num_env_runners=2)
            .training(cost_limit=25.0, kl_bound=0.1, num_sampled_actions=32)
        )
        algo = config.build_algo()

    All CVPO hyper-parameters are set with :meth:`training`; their defaults
    live here and nowhere else.
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or CVPO)
        # --- constraint ---
        self.cost_limit: Union[float, Sequence[float]] = 25.0  # episodic, per constraint
        self.cost_keys: Optional[List[str]] = None  # info keys; None -> ["cost"]
        self.episode_horizon: Optional[int] = None  # None -> the env's time limit
        # --- E-step ---
        self.kl_bound = 0.1  # epsilon: mean KL(q || pi_old) over states
        self.num_sampled_actions = 16  # K actions per state (FSRL's default)
        self.estep_solver = "newton"
        self.estep_lambda_max = 1000.0  # cap on lambda (infeasible steps hit it)
        # --- M-step trust region ---
        self.mstep_kl_mu = 0.01
        self.mstep_kl_sigma = 0.0005
        self.alpha_lr = 10.0  # step size of the KL multipliers' own updates
        self.alpha_mu_max = 10.0
        self.alpha_sigma_max = 100.0
        # --- networks and optimisation ---
        self.actor_hiddens = (128, 128)
        self.critic_hiddens = (128, 128)
        self.std_min = 1e-3
        self.std_max = 2.0
        self.actor_lr = 5e-4
        self.critic_lr = 1e-3
        self.tau = 0.05  # polyak rate of the target actor (pi_old) and critics
        self.n_step = 3
        self.gamma = 0.99
        self.num_reward_critics = 2
        self.reward_critic_reduction = "min"
        self.num_cost_critics = 1  # per constraint
        self.cost_critic_reduction = "mean"
        self.num_target_actions = 1  # actions from pi_old averaged for the TD target V(s')
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
        from rllib_ext.cvpo.callbacks import CostMetricsCallback

        self.callbacks_class = CostMetricsCallback

    @override(AlgorithmConfig)
    def training(
        self,
        *,
        cost_limit=NotProvided,
        cost_keys=NotProvided,
        episode_horizon=NotProvided,
        kl_bound=NotProvided,
        num_sampled_actions=NotProvided,
        estep_solver=NotProvided,
        estep_lambda_max=NotProvided,
        mstep_kl_mu=NotProvided,
        mstep_kl_sigma=NotProvided,
        alpha_lr=NotProvided,
        alpha_mu_max=NotProvided,
        alpha_sigma_max=NotProvided,
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
        num_target_actions=NotProvided,
        training_intensity=NotProvided,
        updates_per_learner_call=NotProvided,
        replay_capacity=NotProvided,
        num_steps_sampled_before_learning_starts=NotProvided,
        store_buffer_in_checkpoints=NotProvided,
        async_sampling=NotProvided,
        learner_torch_threads=NotProvided,
        **kwargs,
    ) -> "CVPOConfig":
        """Sets CVPO's hyper-parameters (any left out keep their value).

        Args:
            cost_limit: episodic cost limit C (a float, or one per constraint).
            cost_keys: the ``info`` keys of the cost signals (default ``["cost"]``,
                the sum of the task's cost terms).
            episode_horizon: T of the threshold formula; default: the env's time limit.
            kl_bound: E-step bound epsilon on the mean KL(q || pi_old).
            num_sampled_actions: K actions sampled per state in the E-step.
            estep_solver: "newton" (exact, fast) or "cvxpy" (the reference model).
            estep_lambda_max: cap on each lambda; reaching it marks an infeasible step.
            mstep_kl_mu, mstep_kl_sigma: trust-region bounds of the M-step.
            alpha_lr, alpha_mu_max, alpha_sigma_max: the KL multipliers' step size and caps.
            actor_hiddens, critic_hiddens: hidden layer sizes.
            std_min, std_max: bounds of the actor's standard deviation.
            actor_lr, critic_lr: Adam learning rates.
            tau: polyak rate of the target actor (pi_old) and target critics.
            n_step: TD window length.
            num_reward_critics: E, the reward-critic ensemble size.
            reward_critic_reduction: "min" or "mean" over the reward ensemble.
            num_cost_critics: ensemble size per constraint.
            cost_critic_reduction: "mean" or "max" over each cost ensemble.
            num_target_actions: actions from pi_old averaged in the TD target.
            training_intensity: gradient updates per sampled env step.
            updates_per_learner_call: minibatch updates per learner call.
            replay_capacity: transitions held by the replay buffer.
            num_steps_sampled_before_learning_starts: warm-up env steps.
            store_buffer_in_checkpoints: also save the replay buffer in checkpoints.
            async_sampling: with remote EnvRunners, sample the next chunk while the
                learner updates on the previous ones (default True).
            learner_torch_threads: torch threads of a CPU learner (None: auto).
        """
        super().training(**kwargs)
        for name, value in list(locals().items()):
            if name in ("self", "kwargs", "__class__") or value is NotProvided:
                continue
            setattr(self, name, value)
        return self

    # -- derived values -----------------------------------------------------------------
    @property
    def constraint_names(self) -> List[str]:
        return list(self.cost_keys) if self.cost_keys else ["cost"]

    @property
    def cost_limits(self) -> List[float]:
        """One limit per constraint."""
        if isinstance(self.cost_limit, (int, float)):
            return [float(self.cost_limit)] * len(self.constraint_names)
        return [float(c) for c in self.cost_limit]

    def step_thresholds(self) -> np.ndarray:
        """Per-step Q_c thresholds eps_k = C_k (1 - gamma^T) / ((1 - gamma) T)."""
        from cvpo.constraints import episodic_to_step_threshold

        if self.episode_horizon is None:
            raise ValueError("episode_horizon is unknown: call validate() with an env set")
        return np.asarray(
            episodic_to_step_threshold(self.cost_limits, self.gamma, int(self.episode_horizon)),
            dtype=np.float64,
        ).reshape(-1)

    # -- validation ---------------------------------------------------------------------
    @override(AlgorithmConfig)
    def validate(self) -> None:
        super().validate()
        from rllib_ext.cvpo.validation import validate_cvpo_config

        validate_cvpo_config(self)

    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from rllib_ext.cvpo.torch.default_cvpo_torch_rl_module import DefaultCVPOTorchRLModule

        return RLModuleSpec(module_class=DefaultCVPOTorchRLModule)

    @override(AlgorithmConfig)
    def get_default_learner_class(self):
        from rllib_ext.cvpo.torch.cvpo_torch_learner import CVPOTorchLearner

        return CVPOTorchLearner

    @property
    @override(AlgorithmConfig)
    def _model_config_auto_includes(self) -> Dict[str, Any]:
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
            f"{sorted(infos[-1]) if infos else []}); set CVPOConfig.training(cost_keys=...) "
            "to keys the env reports, or wrap the env so info['cost'] is set each step"
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


class CVPO(Algorithm):
    """Constrained Variational Policy Optimization (Liu et al., ICML 2022)."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> CVPOConfig:
        return CVPOConfig()

    @classmethod
    @override(Algorithm)
    def from_checkpoint(cls, path, filesystem=None, **kwargs) -> "CVPO":
        """Like ``Algorithm.from_checkpoint``, with one clear error (CheckpointError)
        for a local checkpoint that is missing, damaged, or another algorithm's."""
        if filesystem is None:
            from rllib_ext.cvpo.validation import check_algorithm_checkpoint

            check_algorithm_checkpoint(path, cls)
        return super().from_checkpoint(path, filesystem=filesystem, **kwargs)

    @override(Algorithm)
    def _create_local_replay_buffer_if_necessary(self, config):
        # Our own buffer: n-step sums of reward and of every cost (RLlib's
        # episode buffers keep only the window's first and last infos).
        space = config.action_space
        if space is None:  # filled by validate() from the env
            raise ValueError("CVPOConfig.action_space is unknown: call validate() first")
        self._accumulator = NStepAccumulator(
            config.n_step, config.gamma, action_low=space.low, action_high=space.high
        )
        self._replay = NStepReplayBuffer(config.replay_capacity, seed=config.seed)
        self._num_updates = 0
        self._update_steps_base = None
        return None

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
        cfg: CVPOConfig = self.config
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            if self._uses_async_sampling():
                episodes, env_runner_results = self._sample_async()
            else:
                episodes, env_runner_results = self._sample_sync()
        self.metrics.aggregate(env_runner_results, key=ENV_RUNNER_RESULTS)

        with self.metrics.log_time((TIMERS, REPLAY_BUFFER_ADD_DATA_TIMER)):
            names = cfg.constraint_names
            self._replay.add(self._accumulator.add([episode_to_chunk(e, names) for e in episodes]))

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

    # -- checkpoints ---------------------------------------------------------------------
    @override(Algorithm)
    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state["cvpo_num_updates"] = self._num_updates
        if self.config.store_buffer_in_checkpoints:
            state[REPLAY_STATE_KEY] = self._replay.get_state()
        return state

    @override(Algorithm)
    def set_state(self, state) -> None:
        super().set_state(state)
        if "cvpo_num_updates" in state:
            self._num_updates = int(state["cvpo_num_updates"])
        if REPLAY_STATE_KEY in state:
            self._replay.set_state(state[REPLAY_STATE_KEY])

