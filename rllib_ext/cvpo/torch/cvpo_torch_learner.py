"""The CVPO torch learner: critics, E-step, M-step, targets, in one update.

One gradient update on a minibatch of B n-step transitions (all math from
``cvpo``; this file only wires it into RLlib's Learner):

1. critics: every member regresses onto its n-step TD target
   ``y = R + discount * V_old(s')`` with ``V_old(s') = mean_j reduce(Q_old(s', a'_j))``,
   ``a'_j ~ pi_old(.|s')``;
2. E-step: K actions per state from pi_old, all critics evaluated in one
   batched pass, the convex dual solved exactly -> weights q (B, K);
3. M-step: weighted maximum likelihood inside the decoupled KL trust region;
4. after the optimizer steps, polyak-average pi_old (the target actor) and
   the target critics.

The critic loss and the M-step loss touch disjoint parameters (the E-step is
computed without gradients), so one backward pass serves both optimizers.
A non-finite loss skips the whole update (counted in the metrics), so a NaN in
the critics never reaches the actor's weights.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from typing import Any, Dict, Optional

import numpy as np
import torch
from ray.rllib.core.learner.learner import Learner
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.apis import TargetNetworkAPI
from ray.rllib.utils.annotations import override
from ray.rllib.utils.typing import ModuleID, ParamDict, TensorType

from cvpo import estep
from cvpo._malloc import tune_malloc
from cvpo.mstep import TrustRegion, mstep_loss
from cvpo.networks import polyak_update
from rllib_ext.cvpo import metrics as M
from rllib_ext.cvpo.torch.default_cvpo_torch_rl_module import ACTOR_MEAN, ACTOR_STD

logger = logging.getLogger(__name__)

LEARNER_STATE_KEY = "cvpo_learner_state"
GENERATOR_KEY = "generator"  # + "_<device type>" for a generator that is not on the CPU
_STATUSES = (estep.STATUS_CONVERGED, estep.STATUS_MAX_ITER, estep.STATUS_INFEASIBLE)


def learner_threads(config) -> Optional[int]:
    """torch intra-op threads for a CPU learner, or None to leave torch's setting.

    ``learner_torch_threads`` if set. Otherwise, for a learner in the driver
    (``num_learners=0``) next to remote EnvRunners on this machine, the cores the
    runners leave free (at least 1): the learner's OpenMP barriers otherwise wait
    for scheduler slices on cores busy with rollouts.
    """
    if config.num_gpus_per_learner:
        return None
    if config.learner_torch_threads is not None:
        return int(config.learner_torch_threads)
    if config.num_learners == 0 and config.num_env_runners > 0:
        cores = os.cpu_count() or 1
        busy = config.num_env_runners * max(1, int(config.num_cpus_per_env_runner or 1))
        return max(1, cores - busy)
    return None


def _to_host(tree: Any) -> Any:
    """Every torch tensor in a nested dict / list / tuple -> a numpy array on the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().numpy()
    if isinstance(tree, dict):
        return {k: _to_host(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_host(v) for v in tree)
    return tree


def _tensors_to_cpu(tree: Any) -> Any:
    """Every torch tensor that is not on the CPU -> its CPU copy (others untouched)."""
    if isinstance(tree, torch.Tensor):
        return tree if tree.device.type == "cpu" else tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _tensors_to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tensors_to_cpu(v) for v in tree)
    return tree


def _load_storage_on_cpu(b: bytes):
    """``torch.storage._load_from_bytes`` with ``map_location="cpu"``."""
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=False)


@contextlib.contextmanager
def _load_pickled_tensors_on_cpu():
    """While active, and only where CUDA is not available: pickled torch tensors load
    onto the CPU instead of failing with "Attempting to deserialize object on a CUDA
    device". (A pickled tensor's storage is rebuilt by ``torch.storage._load_from_bytes``,
    which calls ``torch.load`` without a ``map_location``.)"""
    import torch.storage as storage

    if torch.cuda.is_available() or not hasattr(storage, "_load_from_bytes"):
        yield
        return
    original = storage._load_from_bytes
    storage._load_from_bytes = _load_storage_on_cpu
    try:
        yield
    finally:
        storage._load_from_bytes = original


def _adam(params) -> torch.optim.Optimizer:
    """Adam with the fused kernel (one op for all tensors; on CPU ~4x faster per
    step than the default per-tensor loop at CVPO's sizes, measured 0.3 vs 1.4 ms),
    or the multi-tensor path where this torch/device has no fused Adam."""
    try:
        return torch.optim.Adam(params, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, foreach=True)


class CVPOTorchLearner(TorchLearner):
    """TorchLearner for CVPO (see the module docstring)."""

    @override(TorchLearner)
    def build(self) -> None:
        tune_malloc()  # keep the E-step's multi-MB activations on warm heap pages
        threads = learner_threads(self.config)
        if threads is not None and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        super().build()
        self.module.foreach_module(
            lambda mid, mod: mod.make_target_networks()
            if isinstance(mod, TargetNetworkAPI)
            else None
        )
        self._trust: Dict[ModuleID, TrustRegion] = {}
        self._dual: Dict[ModuleID, Optional[tuple]] = {}
        self._counters: Dict[ModuleID, Dict[str, int]] = {}
        self._skip_update = False
        self._pending: Dict[ModuleID, Dict[str, Any]] = {}  # per-update stats to log
        self._threshold_cache: Dict[ModuleID, np.ndarray] = {}
        seed = self.config.seed if self.config.seed is not None else 0
        self._generator = torch.Generator(device=self._device)
        self._generator.manual_seed(int(seed) + 7919)
        for mid in self.module.keys():
            self._init_module_state(mid)

    def _init_module_state(self, mid: ModuleID) -> None:
        cfg = self.config.get_config_for_module(mid)
        self._trust[mid] = TrustRegion(
            eps_mu=cfg.mstep_kl_mu,
            eps_sigma=cfg.mstep_kl_sigma,
            alpha_lr=cfg.alpha_lr,
            alpha_mu_max=cfg.alpha_mu_max,
            alpha_sigma_max=cfg.alpha_sigma_max,
        )
        self._dual[mid] = None
        self._counters[mid] = {"updates": 0, "skipped": 0}

    @override(TorchLearner)
    def configure_optimizers_for_module(self, module_id: ModuleID, config=None) -> None:
        module = self._module[module_id]
        critic_params = self.get_parameters(module.critics)
        self.register_optimizer(
            module_id=module_id,
            optimizer_name="critic",
            optimizer=_adam(critic_params),
            params=critic_params,
            lr_or_lr_schedule=config.critic_lr,
        )
        actor_params = self.get_parameters(module.actor)
        self.register_optimizer(
            module_id=module_id,
            optimizer_name="actor",
            optimizer=_adam(actor_params),
            params=actor_params,
            lr_or_lr_schedule=config.actor_lr,
        )

    # -- the update -------------------------------------------------------------------
    def _sample(self, mean: torch.Tensor, std: torch.Tensor, k: int) -> torch.Tensor:
        """k samples per state from N(mean, diag(std^2)): (B, d) -> (B, k, d)."""
        eps = torch.randn(
            (mean.shape[0], k, mean.shape[-1]),
            generator=self._generator,
            device=mean.device,
            dtype=mean.dtype,
        )
        return mean.unsqueeze(1) + std.unsqueeze(1) * eps

    @staticmethod
    def _reduce(q: torch.Tensor, how: str, dim: int) -> torch.Tensor:
        if how == "min":
            return q.min(dim=dim).values
        if how == "max":
            return q.max(dim=dim).values
        return q.mean(dim=dim)

    def _values(self, module, critics, obs, actions, cfg, cost_reduction=None):
        """Reward and cost values from one batched critic pass.

        obs (B, o), actions (B, K, d) -> q (B, K), qc (m, B, K). Each constraint's
        cost critics are combined by ``cost_reduction`` (default: the config's).
        """
        low, high = module._action_low, module._action_high
        q_all = critics(obs, torch.clamp(actions, low, high))  # (M, B, K)
        E, m, Ec = module.num_reward_critics, module.num_constraints, module.num_cost_critics
        q = self._reduce(q_all[:E], cfg.reward_critic_reduction, 0)  # (B, K)
        qc = q_all[E:].reshape(m, Ec, *q_all.shape[1:])  # (m, Ec, B, K)
        qc = self._reduce(qc, cost_reduction or cfg.cost_critic_reduction, 1)  # (m, B, K)
        return q, qc

    @override(Learner)
    def compute_loss_for_module(
        self,
        *,
        module_id: ModuleID,
        config,
        batch: Dict[str, Any],
        fwd_out: Dict[str, TensorType],
    ) -> TensorType:
        module = self.module[module_id].unwrapped()
        if not hasattr(module, "_action_low"):
            space = module.action_space
            module._action_low = torch.as_tensor(space.low, dtype=torch.float32, device=self._device)
            module._action_high = torch.as_tensor(space.high, dtype=torch.float32, device=self._device)
        obs = batch["obs"].reshape(batch["obs"].shape[0], -1).float()  # (B, o)
        actions = batch["actions"].float()  # (B, d)
        next_obs = batch["next_obs"].reshape(obs.shape[0], -1).float()  # (B, o)
        rewards = batch["rewards"].float()  # (B,)
        costs = batch["costs"].float().reshape(obs.shape[0], -1)  # (B, m)
        discounts = batch["discounts"].float()  # (B,)
        E, _m = module.num_reward_critics, module.num_constraints

        # ---- critics: n-step TD against the old policy and target critics
        with torch.no_grad():
            mu_next, std_next = module.target_actor(next_obs)  # (B, d)
            a_next = self._sample(mu_next, std_next, config.num_target_actions)  # (B, Kt, d)
            # the cost target bootstraps with cost_target_reduction (default the mean):
            # a max here compounds over the horizon (docs/constraint.md)
            v_next, vc_next = self._values(
                module, module.target_critics, next_obs, a_next, config,
                cost_reduction=config.cost_target_reduction,
            )
            y_r = rewards + discounts * v_next.mean(-1)  # (B,)
            y_c = costs.T + discounts * vc_next.mean(-1)  # (m, B)
            target = torch.cat(
                [y_r.expand(E, -1), y_c.repeat_interleave(module.num_cost_critics, dim=0)]
            )  # (M, B)
        q_pred = module.critics(obs, actions)  # (M, B)
        member_mse = ((q_pred - target) ** 2).mean(dim=1)  # (M,)
        critic_loss = member_mse.sum()

        # ---- E-step: the non-parametric q over K samples from pi_old
        with torch.no_grad():
            t0 = time.perf_counter()
            mu_old, std_old = module.target_actor(obs)  # (B, d)
            sampled = self._sample(mu_old, std_old, config.num_sampled_actions)  # (B, K, d)
            q, qc = self._values(module, module.target_critics, obs, sampled, config)
            t_eval = time.perf_counter() - t0
            # A NaN/inf observation or diverged target critics would make solve_dual
            # raise; neutralise them here (no host sync): the critic loss of the same
            # rows is non-finite too, so the guard below skips the whole update.
            q = torch.nan_to_num(q, nan=0.0, posinf=0.0, neginf=0.0)
            qc = torch.nan_to_num(qc, nan=0.0, posinf=0.0, neginf=0.0)
            dual = estep.solve_dual(
                q,
                qc,
                config.kl_bound,
                self._thresholds(module_id, config),
                solver=config.estep_solver,
                init=self._dual[module_id],
                lambda_max=config.estep_lambda_max,
            )

        # ---- M-step: weighted MLE inside the decoupled trust region
        trust = self._trust[module_id]
        actor_loss, stats = mstep_loss(
            fwd_out[ACTOR_MEAN],
            fwd_out[ACTOR_STD],
            mu_old,
            std_old,
            sampled,
            dual.weights,
            trust,
        )
        total = critic_loss + actor_loss
        # the one host sync per update: a non-finite loss skips the whole update
        self._skip_update = not bool(torch.isfinite(total))
        counters = self._counters[module_id]
        if self._skip_update:
            counters["skipped"] += 1
        else:
            self._dual[module_id] = (dual.eta, dual.lambdas)
            trust.update(stats["kl_mu"], stats["kl_sigma"])
            counters["updates"] += 1
        self._log(module_id, module, dual, stats, member_mse, q, qc, t_eval, trust)
        return total

    def _thresholds(self, module_id: ModuleID, config) -> np.ndarray:
        if module_id not in self._threshold_cache:
            self._threshold_cache[module_id] = config.step_thresholds()
        return self._threshold_cache[module_id]

    def set_step_thresholds(self, module_id: ModuleID, thresholds) -> None:
        """Sets the E-step's per-step cost thresholds (the Algorithm adapts them; cvpo.threshold)."""
        self._threshold_cache[module_id] = np.asarray(thresholds, np.float64).reshape(-1)

    def _log(self, mid, module, dual, stats, member_mse, q, qc, t_eval, trust) -> None:
        """Records this update's statistics; ``after_gradient_based_update`` logs
        them once per learner call (means over its updates, last values of the
        state variables, sums of the status counts): one stacked tensor per
        update instead of ~25 MetricsLogger calls."""
        E = module.num_reward_critics
        tensors = [qc.mean(dim=(1, 2)), stats["kl_mu"].reshape(1), stats["kl_sigma"].reshape(1),
                   stats["mle"].reshape(1), member_mse[:E].mean().reshape(1), q.mean().reshape(1)]
        if member_mse.shape[0] > E:
            tensors.append(member_mse[E:].mean().reshape(1))
        status = dual.status
        record = self._pending.setdefault(mid, {"means": [], "host": [], "status": []})
        record["means"].append(torch.cat([t.detach().float() for t in tensors]))
        record["host"].append((dual.solve_time, t_eval, dual.iterations, int(dual.fallback)))
        record["status"].append(status)
        record["last"] = (dual.eta, dual.lambdas, trust)

    def _flush_metrics(self, mid) -> None:
        record = self._pending.pop(mid, None)
        if not record or not record["means"]:
            return
        cfg = self.config.get_config_for_module(mid)
        names = cfg.constraint_names
        m = len(names)
        log = self.metrics.log_value
        means = torch.stack(record["means"]).mean(dim=0).tolist()
        eta, lambdas, trust = record["last"]
        log((mid, M.ETA), float(eta), window=1)
        lambdas = torch.as_tensor(lambdas).tolist()
        thresholds = self._thresholds(mid, cfg)
        for k, name in enumerate(names):
            log((mid, M.LAMBDA_PREFIX + name), lambdas[k], window=1)
            log((mid, M.QC_MEAN_PREFIX + name), means[k], window=1)
            if np.isfinite(thresholds[k]):  # inf (constraint off) upsets TensorBoard loggers
                log((mid, M.STEP_THRESHOLD_PREFIX + name), float(thresholds[k]), window=1)
        host = np.asarray(record["host"], dtype=np.float64)
        log((mid, M.ESTEP_SOLVE_TIME_S), float(host[:, 0].mean()), window=1)
        log((mid, M.ESTEP_CRITIC_EVAL_TIME_S), float(host[:, 1].mean()), window=1)
        log((mid, M.ESTEP_ITERATIONS), float(host[:, 2].mean()), window=1)
        for status in _STATUSES:
            hits = sum(s == status or s.endswith(":" + status) for s in record["status"])
            log((mid, M.ESTEP_STATUS_PREFIX + status), hits, reduce="sum")
        log((mid, M.ESTEP_FALLBACKS), int(host[:, 3].sum()), reduce="sum")
        kl_mu, kl_sigma, mle, reward_loss, q_mean = means[m : m + 5]
        log((mid, M.KL_MU), kl_mu, window=1)
        log((mid, M.KL_SIGMA), kl_sigma, window=1)
        log((mid, M.MLE_LOSS), mle, window=1)
        log((mid, M.ALPHA_MU), float(trust.alpha_mu), window=1)
        log((mid, M.ALPHA_SIGMA), float(trust.alpha_sigma), window=1)
        log((mid, M.REWARD_CRITIC_LOSS), reward_loss, window=1)
        if len(means) > m + 5:
            log((mid, M.COST_CRITIC_LOSS), means[m + 5], window=1)
        log((mid, M.Q_MEAN), q_mean, window=1)
        counters = self._counters[mid]
        log((mid, M.NUM_UPDATES), counters["updates"], window=1)
        log((mid, M.NUM_SKIPPED_UPDATES), counters["skipped"], window=1)

    @override(Learner)
    def after_gradient_based_update(self, *, timesteps: Dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        for mid in list(self._pending):
            self._flush_metrics(mid)

    @override(TorchLearner)
    def compute_gradients(self, loss_per_module: Dict[ModuleID, TensorType], **kwargs) -> ParamDict:
        if self._skip_update:
            for optim in self._optimizer_parameters:
                optim.zero_grad(set_to_none=True)
            return {}
        return super().compute_gradients(loss_per_module, **kwargs)

    @override(TorchLearner)
    def apply_gradients(self, gradients_dict: ParamDict) -> None:
        if self._skip_update:
            return
        # The loss was checked finite above; stepping without RLlib's per-tensor
        # isfinite checks saves one host sync per parameter tensor.
        for pid, grad in gradients_dict.items():
            self._params[pid].grad = grad
        for module_id, names in self._module_optimizers.items():
            for name in names:
                self.get_optimizer(module_id, name).step()
            module = self.module[module_id].unwrapped()
            tau = self.config.get_config_for_module(module_id).tau
            for main, target in module.get_target_network_pairs():
                polyak_update(target, main, tau)

    # -- state ----------------------------------------------------------------------------
    # The learner's own state holds numpy arrays and Python numbers only (no torch
    # tensors, no device), so a checkpoint written by a GPU learner unpickles on a
    # CPU-only machine. The sampling generator lives on the learner's device; its
    # state is stored under "generator" (CPU) or "generator_<device type>" (e.g.
    # "generator_cuda": a CUDA generator's state cannot seed a CPU one). A learner
    # that finds no state for its own device type reseeds deterministically.
    def _generator_key(self) -> str:
        kind = self._generator.device.type
        return GENERATOR_KEY if kind == "cpu" else f"{GENERATOR_KEY}_{kind}"

    def _cvpo_state(self) -> Dict[str, Any]:
        out = {self._generator_key(): self._generator.get_state().cpu().numpy()}
        for mid in self.module.keys():
            dual = self._dual.get(mid)
            out[mid] = {
                "dual": None
                if dual is None
                else (
                    float(torch.as_tensor(dual[0]).item()),
                    torch.as_tensor(dual[1]).detach().cpu().numpy(),
                ),
                "trust_region": _to_host(self._trust[mid].state_dict()),
                "counters": dict(self._counters[mid]),
            }
        return out

    def _set_cvpo_state(self, state: Dict[str, Any]) -> None:
        state = _to_host(state)  # tensors of any device (older checkpoints) -> numpy
        key = self._generator_key()
        if key in state:
            self._generator.set_state(torch.as_tensor(np.asarray(state[key]), dtype=torch.uint8))
        else:
            # e.g. a GPU learner's checkpoint restored on a CPU-only machine: its CUDA
            # generator state cannot drive a CPU generator. Reseed from the seed and the
            # number of updates done, so the restore is deterministic.
            seed = self.config.seed if self.config.seed is not None else 0
            done = sum(
                int(s["counters"].get("updates", 0))
                for mid, s in state.items()
                if mid in self.module.keys() and isinstance(s, dict) and "counters" in s
            )
            self._generator.manual_seed(int(seed) + 7919 + done)
            stored = sorted(k for k in state if isinstance(k, str) and k.startswith(GENERATOR_KEY))
            if stored:
                logger.warning(
                    "CVPO learner on %s: the checkpoint holds the sampling generator state "
                    "for %s only; reseeded it from seed %s and %d updates.",
                    self._generator.device, ", ".join(stored), seed, done,
                )
        for mid in self.module.keys():
            if mid not in state:
                continue
            s = state[mid]
            if s["dual"] is None:
                self._dual[mid] = None
            else:
                eta, lambdas = s["dual"]
                self._dual[mid] = (
                    torch.tensor(float(eta), dtype=torch.float64),
                    torch.as_tensor(np.asarray(lambdas)),
                )
            self._trust[mid].load_state_dict(s["trust_region"])
            self._counters[mid] = dict(s["counters"])

    @override(Learner)
    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state[LEARNER_STATE_KEY] = self._cvpo_state()
        return state

    @override(Learner)
    def set_state(self, state) -> None:
        if not torch.cuda.is_available():
            state = _tensors_to_cpu(state)  # a GPU learner's tensors, on a CPU-only machine
        super().set_state(state)
        if LEARNER_STATE_KEY in state:
            self._set_cvpo_state(state[LEARNER_STATE_KEY])

    @override(Learner)
    def restore_from_path(self, *args, **kwargs) -> None:
        # A checkpoint whose pickles hold CUDA tensors (older GPU runs) loads on a
        # CPU-only machine with the tensors mapped to the CPU.
        with _load_pickled_tensors_on_cpu():
            return super().restore_from_path(*args, **kwargs)

    def get_cvpo_state(self) -> Dict[str, Any]:
        """eta, lambdas, alphas and counters (for tests and diagnostics)."""
        return self._cvpo_state()
