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
import os
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
from cvpo.threshold import ThresholdFeedback, TimingCorrection
from rllib_ext.cvpo import metrics as M

logger = logging.getLogger(__name__)

ESTEP_SOLVERS = ("newton", "cvxpy")
REWARD_REDUCTIONS = ("min", "mean")
COST_REDUCTIONS = ("mean", "max")
THRESHOLD_TIMINGS = ("measured", "even")
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
        # The per-step threshold (cvpo.threshold, docs/constraint.md): "even" is the paper's
        # C (1 - gamma^T) / ((1 - gamma) T), exact for cost spread evenly over the episode;
        # "measured" replaces the even spread by the cost timing of the last
        # `threshold_timing_window` finished training episodes.
        self.step_threshold_timing = "measured"
        self.threshold_timing_window = 100
        # Episodic-cost feedback: kappa scales the threshold, log kappa moves by this rate per
        # finished training episode toward meeting the limit; 0 (default) switches it off.
        self.threshold_feedback_rate = 0.0
        self.threshold_kappa_range = (0.05, 1.0)
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
        # Two cost critics per constraint, the larger value counts: the E-step prefers the
        # actions whose cost is underestimated, and one critic let ~10 % more cost through
        # (docs/constraint.md). 1 and "mean" are the paper's single critic.
        self.num_cost_critics = 2  # per constraint
        self.cost_critic_reduction = "max"
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
        # --- evaluation (RLlib's .evaluation(); off until evaluation_interval is set) ---
        # Evaluation EnvRunners act deterministically (the Gaussian's mean), as the
        # safe-RL papers evaluate; ``.evaluation(evaluation_config={"explore": True})``
        # evaluates the stochastic policy instead.
        self.evaluation_config = AlgorithmConfig.overrides(explore=False)
        # After each evaluation whose cost meets every limit and whose return beats the
        # best such evaluation so far, save a checkpoint to <trial dir>/best_feasible.
        self.keep_best_feasible_checkpoint = True
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
        step_threshold_timing=NotProvided,
        threshold_timing_window=NotProvided,
        threshold_feedback_rate=NotProvided,
        threshold_kappa_range=NotProvided,
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
        keep_best_feasible_checkpoint=NotProvided,
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
            step_threshold_timing: "measured" (the threshold from the cost timing of
                recent training episodes) or "even" (the paper's formula).
            threshold_timing_window: finished episodes the timing is measured over.
            threshold_feedback_rate: step of log kappa per finished training episode,
                where kappa scales the per-step cost threshold so that the measured
                episodic cost meets the limit (cvpo.threshold); 0 switches it off.
            threshold_kappa_range: (min, max) of kappa.
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
    def constraint_names(self) -> List[str]:
        return list(self.cost_keys) if self.cost_keys else ["cost"]

    @property
    def cost_limits(self) -> List[float]:
        """One limit per constraint (cvpo.constraints.cost_limits)."""
        from cvpo.constraints import cost_limits

        return cost_limits(self.cost_limit, self.constraint_names)

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
            from rllib_ext.cvpo.validation import (
                absolute_checkpoint_path,
                check_algorithm_checkpoint,
            )

            check_algorithm_checkpoint(path, cls)
            path = absolute_checkpoint_path(path)  # pyarrow fails on relative paths
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
        self._best_feasible_return = -np.inf
        self._feedback = ThresholdFeedback(
            config.cost_limits, config.threshold_feedback_rate, config.threshold_kappa_range
        )
        self._timing = (
            TimingCorrection(len(config.cost_limits), config.gamma, config.threshold_timing_window)
            if config.step_threshold_timing == "measured"
            else None
        )
        self._open_episode_costs: Dict[str, List[np.ndarray]] = {}  # episode id -> cost chunks
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
            chunks = [episode_to_chunk(e, names) for e in episodes]
            self._replay.add(self._accumulator.add(chunks))
        self._feed_threshold(chunks)

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

    # -- episodic-cost feedback on the threshold ------------------------------------------
    def _feed_threshold(self, chunks: Sequence[EpisodeChunk]) -> None:
        """Collects each training episode's per-step costs over its chunks; finished
        episodes update the timing correction and the feedback (cvpo.threshold), and
        the learners get the resulting step thresholds."""
        cfg = self.config
        adaptive = self._feedback.enabled or self._timing is not None
        finished = []
        for c in chunks if adaptive else ():
            parts = self._open_episode_costs.pop(c.episode_id, [])
            parts.append(c.costs)
            if c.terminated or c.truncated:
                finished.append((np.concatenate(parts), c.truncated and not c.terminated))
            else:
                self._open_episode_costs[c.episode_id] = parts
        if finished:
            self._feedback.update(np.stack([costs.sum(axis=0) for costs, _ in finished]))
            if self._timing is not None:
                for costs, truncated in finished:
                    self._timing.update(costs, truncated)
            self._push_thresholds()
        names = cfg.constraint_names
        for name, kappa, timing in zip(names, self._feedback.kappa, self._timing_factor()):
            self.metrics.log_value((M.CVPO_RESULTS, M.THRESHOLD_SCALE_PREFIX + name), float(kappa), window=1)
            self.metrics.log_value((M.CVPO_RESULTS, M.THRESHOLD_TIMING_PREFIX + name), float(timing), window=1)
        if np.isfinite(self._best_feasible_return):
            self.metrics.log_value(
                (M.CVPO_RESULTS, M.BEST_FEASIBLE_RETURN), self._best_feasible_return, window=1
            )

    def _timing_factor(self) -> np.ndarray:
        """rho / rho_even per constraint: 1 for cost spread evenly, < 1 for early cost."""
        limits = np.asarray(self.config.cost_limits, dtype=np.float64)
        active = np.isfinite(limits) & (limits > 0)  # 0 and inf: the threshold is 0 / inf anyway
        even = np.where(active, self.config.step_thresholds() / np.where(active, limits, 1.0), 1.0)
        if self._timing is None:
            return np.ones_like(even)
        return np.where(active, self._timing.rho(even) / even, 1.0)

    def step_thresholds(self) -> np.ndarray:
        """The per-step thresholds the E-step uses now: C * rho * kappa (docs/constraint.md)."""
        return self.config.step_thresholds() * self._timing_factor() * self._feedback.kappa

    def _push_thresholds(self) -> None:
        eps = self.step_thresholds()
        self.learner_group.foreach_learner(
            lambda learner: learner.set_step_thresholds(DEFAULT_MODULE_ID, eps)
        )

    # -- evaluation ----------------------------------------------------------------------
    @override(Algorithm)
    def evaluate(self, *args, **kwargs):
        results = super().evaluate(*args, **kwargs)
        if self.config.keep_best_feasible_checkpoint:
            self._maybe_save_best_feasible(results.get(ENV_RUNNER_RESULTS) or {})
        return results

    def _evaluation_feasible(self, eval_runner_results: Dict[str, Any]) -> Optional[bool]:
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
    best_feasible_path: Optional[str] = None

    def best_feasible_checkpoint_dir(self) -> str:
        """Where the best feasible checkpoint goes: ``best_feasible_path`` if set, else
        ``best_feasible`` in the trial folder under Tune, or in the logdir without Tune."""
        if self.best_feasible_path:
            return self.best_feasible_path
        storage = getattr(self, "_storage", None)
        base = storage.trial_fs_path if storage is not None else self.logdir
        return os.path.join(base, M.BEST_FEASIBLE_DIR)

    def _maybe_save_best_feasible(self, eval_runner_results: Dict[str, Any]) -> None:
        ret = eval_runner_results.get(M.EPISODE_RETURN_MEAN)
        if ret is None or not np.isfinite(ret) or not self._evaluation_feasible(eval_runner_results):
            return
        if ret <= self._best_feasible_return:
            return
        self._best_feasible_return = float(ret)
        storage = getattr(self, "_storage", None)
        path = self.best_feasible_checkpoint_dir()
        fs = storage.storage_filesystem if storage is not None and not self.best_feasible_path else None
        self.save_to_path(path, filesystem=fs)
        logger.info("best feasible evaluation return %.3f: checkpoint %s", ret, path)

    # -- checkpoints ---------------------------------------------------------------------
    @override(Algorithm)
    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state["cvpo_num_updates"] = self._num_updates
        state["cvpo_best_feasible_return"] = self._best_feasible_return
        state["cvpo_threshold_feedback"] = self._feedback.get_state()
        state["cvpo_open_episode_costs"] = {
            k: [c.tolist() for c in parts] for k, parts in self._open_episode_costs.items()
        }
        if self._timing is not None:
            state["cvpo_threshold_timing"] = self._timing.get_state()
        if self.config.store_buffer_in_checkpoints:
            state[REPLAY_STATE_KEY] = self._replay.get_state()
        return state

    @override(Algorithm)
    def set_state(self, state) -> None:
        super().set_state(state)
        if "cvpo_num_updates" in state:
            self._num_updates = int(state["cvpo_num_updates"])
        if "cvpo_best_feasible_return" in state:
            self._best_feasible_return = float(state["cvpo_best_feasible_return"])
        if "cvpo_threshold_feedback" in state:
            self._feedback.set_state(state["cvpo_threshold_feedback"])
            self._open_episode_costs = {
                k: [np.asarray(c, np.float64) for c in parts]
                for k, parts in state.get("cvpo_open_episode_costs", {}).items()
            }
            if self._timing is not None and "cvpo_threshold_timing" in state:
                self._timing.set_state(state["cvpo_threshold_timing"])
            self._push_thresholds()
        if REPLAY_STATE_KEY in state:
            self._replay.set_state(state[REPLAY_STATE_KEY])

