"""The SACLag torch learner: critics, actor, temperature and targets in one update.

One gradient update on a minibatch of B n-step transitions (the same replay
columns as CVPO's: ``obs, actions, rewards, costs (B, m), next_obs, discounts``):

1. critics: every member regresses onto its n-step TD target with a' ~ pi(.|s')
   from the CURRENT actor and the target critics,
   ``y_r = R + discount * (reduce_r Q_r'(s', a') - alpha log pi(a'|s'))`` for the
   reward members and ``y_c,k = C_k + discount * reduce_t Q_c,k'(s', a')`` (reduce_t:
   ``cost_target_reduction`` over constraint k's cost critics, as in CVPO) for its
   cost members (no entropy bonus in the cost);
2. actor: a ~ pi(.|s) reparameterised,
   ``L_pi = mean_s [alpha log pi(a|s) - reduce_r Q_r(s, a) + sum_k lambda_k reduce_c Q_c,k(s, a)]``,
   divided by ``1 + sum_k lambda_k`` when ``lagrangian_normalize_actor_loss``;
   the critics enter with their parameters detached, so this loss moves the actor only;
3. temperature: ``L_alpha = -mean_s log_alpha (log pi(a|s) + target_entropy)``;
4. after the optimizer steps, polyak-average the target critics (``tau``).

The three losses touch disjoint parameters, so one backward pass serves the
three optimizers. The multipliers lambda_k come from the Algorithm
(:meth:`SACLagTorchLearner.set_lagrange_multipliers`, :mod:`cvpo.lagrange`).
A non-finite loss skips the whole update (counted in the metrics).
"""

from __future__ import annotations

import logging
from typing import Any, Dict

import numpy as np
import torch
from ray.rllib.core.learner.learner import Learner
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.apis import TargetNetworkAPI
from ray.rllib.utils.annotations import override
from ray.rllib.utils.typing import ModuleID, ParamDict, TensorType

from cvpo.networks import polyak_update
from rllib_ext.cvpo import metrics as M
from rllib_ext.cvpo.torch.cvpo_torch_learner import (
    GENERATOR_KEY,
    _adam,
    _load_pickled_tensors_on_cpu,
    _tensors_to_cpu,
    _to_host,
    learner_threads,
)
from rllib_ext.sac_lag.torch.default_sac_lag_torch_rl_module import ACTOR_MEAN, ACTOR_STD

logger = logging.getLogger(__name__)

LEARNER_STATE_KEY = "saclag_learner_state"


def _reduce(q: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    if how == "min":
        return q.min(dim=dim).values
    if how == "max":
        return q.max(dim=dim).values
    return q.mean(dim=dim)


class SACLagTorchLearner(TorchLearner):
    """TorchLearner for SACLag (see the module docstring)."""

    @override(TorchLearner)
    def build(self) -> None:
        threads = learner_threads(self.config)
        if threads is not None and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        super().build()
        self.module.foreach_module(
            lambda mid, mod: mod.make_target_networks()
            if isinstance(mod, TargetNetworkAPI)
            else None
        )
        self._multipliers: Dict[ModuleID, np.ndarray] = {}
        self._multiplier_tensors: Dict[ModuleID, torch.Tensor] = {}
        self._counters: Dict[ModuleID, Dict[str, int]] = {}
        self._pending: Dict[ModuleID, list] = {}  # per-update stats to log
        self._skip_update = False
        seed = self.config.seed if self.config.seed is not None else 0
        self._generator = torch.Generator(device=self._device)
        self._generator.manual_seed(int(seed) + 7919)
        for mid in self.module.keys():
            cfg = self.config.get_config_for_module(mid)
            self._multipliers[mid] = np.asarray(cfg.initial_multipliers(), np.float64)
            self._counters[mid] = {"updates": 0, "skipped": 0}

    @override(TorchLearner)
    def configure_optimizers_for_module(self, module_id: ModuleID, config=None) -> None:
        module = self._module[module_id]
        for name, params, lr in (
            ("critic", self.get_parameters(module.critics), config.critic_lr),
            ("actor", self.get_parameters(module.actor), config.actor_lr),
            ("alpha", [module.log_alpha], config.alpha_lr),
        ):
            self.register_optimizer(
                module_id=module_id,
                optimizer_name=name,
                optimizer=_adam(params),
                params=params,
                lr_or_lr_schedule=lr,
            )

    # -- the multipliers ------------------------------------------------------------------
    def set_lagrange_multipliers(self, module_id: ModuleID, values) -> None:
        """Sets lambda_k of the actor loss (the Algorithm updates them; cvpo.lagrange)."""
        self._multipliers[module_id] = np.asarray(values, np.float64).reshape(-1)
        self._multiplier_tensors.pop(module_id, None)

    def _lambda(self, module_id: ModuleID) -> torch.Tensor:
        if module_id not in self._multiplier_tensors:
            self._multiplier_tensors[module_id] = torch.as_tensor(
                self._multipliers[module_id], dtype=torch.float32, device=self._device
            )
        return self._multiplier_tensors[module_id]

    @staticmethod
    def _target_entropy(config, act_dim: int) -> float:
        t = config.target_entropy
        return -float(act_dim) if t == "auto" else float(t)

    # -- the update -------------------------------------------------------------------
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
        B = batch["obs"].shape[0]
        obs = batch["obs"].reshape(B, -1).float()  # (B, o)
        actions = batch["actions"].float().reshape(B, -1)  # (B, d)
        next_obs = batch["next_obs"].reshape(B, -1).float()  # (B, o)
        rewards = batch["rewards"].float()  # (B,)
        costs = batch["costs"].float().reshape(B, -1)  # (B, m)
        discounts = batch["discounts"].float()  # (B,)
        E, m, Ec = module.num_reward_critics, module.num_constraints, module.num_cost_critics
        alpha = module.log_alpha.exp().detach()

        # ---- critics: n-step TD with a' ~ pi(.|s') and the target critics
        with torch.no_grad():
            mu_next, std_next = module.actor(next_obs)
            squashed_next, logp_next = module.squashed_sample(mu_next, std_next, self._generator)
            q_next = module.target_critics(next_obs, module.to_env_units(squashed_next))  # (M, B)
            v_r = _reduce(q_next[:E], config.reward_critic_reduction, 0) - alpha * logp_next
            # the cost target reduces each constraint's critics by cost_target_reduction
            # (default the mean: a max compounds over the horizon, docs/constraint.md);
            # cost_critic_reduction acts in the actor loss
            v_c = _reduce(q_next[E:].reshape(m, Ec, B), config.cost_target_reduction, 1)  # (m, B)
            y_r = rewards + discounts * v_r  # (B,)
            y_c = costs.T + discounts * v_c  # (m, B)
            target = torch.cat([y_r.expand(E, -1), y_c.repeat_interleave(Ec, dim=0)])  # (M, B)
        q_pred = module.critics(obs, actions)  # (M, B)
        member_mse = ((q_pred - target) ** 2).mean(dim=1)  # (M,)
        critic_loss = member_mse.sum()

        # ---- actor: reparameterised sample, critics with detached parameters
        squashed, logp = module.squashed_sample(fwd_out[ACTOR_MEAN], fwd_out[ACTOR_STD], self._generator)
        frozen = {name: p.detach() for name, p in module.critics.named_parameters()}
        q_pi = torch.func.functional_call(module.critics, frozen, (obs, module.to_env_units(squashed)))
        qr_pi = _reduce(q_pi[:E], config.reward_critic_reduction, 0)  # (B,)
        qc_pi = _reduce(q_pi[E:].reshape(m, Ec, B), config.cost_critic_reduction, 1)  # (m, B)
        lam = self._lambda(module_id)  # (m,)
        actor_loss = (alpha * logp - qr_pi + (lam.unsqueeze(1) * qc_pi).sum(0)).mean()
        if config.lagrangian_normalize_actor_loss:
            actor_loss = actor_loss / (1.0 + lam.sum())

        # ---- temperature
        target_entropy = self._target_entropy(config, module.act_dim)
        alpha_loss = -(module.log_alpha * (logp.detach() + target_entropy)).mean()

        total = critic_loss + actor_loss + alpha_loss
        # the one host sync per update: a non-finite loss skips the whole update
        self._skip_update = not bool(torch.isfinite(total))
        counters = self._counters[module_id]
        counters["skipped" if self._skip_update else "updates"] += 1
        stats = [member_mse[:E].mean().reshape(1), q_pred[:E].mean().reshape(1),
                 actor_loss.detach().reshape(1), alpha_loss.detach().reshape(1),
                 (-logp.detach().mean()).reshape(1), alpha.reshape(1),
                 q_pred[E:].reshape(m, Ec, B).mean(dim=(1, 2)).detach()]
        if m * Ec:
            stats.append(member_mse[E:].mean().reshape(1))
        self._pending.setdefault(module_id, []).append(torch.cat([s.detach().float() for s in stats]))
        return total

    def _flush_metrics(self, mid) -> None:
        rows = self._pending.pop(mid, None)
        if not rows:
            return
        cfg = self.config.get_config_for_module(mid)
        names = cfg.constraint_names
        m = len(names)
        log = self.metrics.log_value
        means = torch.stack(rows).mean(dim=0).tolist()
        reward_loss, q_mean, actor_loss, alpha_loss, entropy, alpha = means[:6]
        log((mid, M.REWARD_CRITIC_LOSS), reward_loss, window=1)
        log((mid, M.Q_MEAN), q_mean, window=1)
        log((mid, M.ACTOR_LOSS), actor_loss, window=1)
        log((mid, M.ENTROPY_ALPHA_LOSS), alpha_loss, window=1)
        log((mid, M.POLICY_ENTROPY), entropy, window=1)
        log((mid, M.ENTROPY_ALPHA), alpha, window=1)
        lambdas = self._multipliers[mid]
        for k, name in enumerate(names):
            log((mid, M.QC_MEAN_PREFIX + name), means[6 + k], window=1)
            log((mid, M.LAGRANGE_MULTIPLIER_PREFIX + name), float(lambdas[k]), window=1)
        if len(means) > 6 + m:
            log((mid, M.COST_CRITIC_LOSS), means[6 + m], window=1)
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
        # The loss was checked finite above: step without RLlib's per-tensor checks.
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
    # numpy and Python numbers only (a GPU learner's checkpoint unpickles on a CPU-only
    # machine); the sampling generator's state is stored per device type, as CVPO's.
    def _generator_key(self) -> str:
        kind = self._generator.device.type
        return GENERATOR_KEY if kind == "cpu" else f"{GENERATOR_KEY}_{kind}"

    def get_saclag_state(self) -> Dict[str, Any]:
        """Multipliers in use, counters and the sampling generator (tests, diagnostics)."""
        out: Dict[str, Any] = {self._generator_key(): self._generator.get_state().cpu().numpy()}
        for mid in self.module.keys():
            out[mid] = {
                "multipliers": self._multipliers[mid].tolist(),
                "counters": dict(self._counters[mid]),
            }
        return out

    def _set_saclag_state(self, state: Dict[str, Any]) -> None:
        state = _to_host(state)
        key = self._generator_key()
        done = 0
        for mid in self.module.keys():
            if mid in state:
                self.set_lagrange_multipliers(mid, state[mid]["multipliers"])
                self._counters[mid] = dict(state[mid]["counters"])
                done += int(self._counters[mid].get("updates", 0))
        if key in state:
            self._generator.set_state(torch.as_tensor(np.asarray(state[key]), dtype=torch.uint8))
        else:  # another device type's generator: reseed deterministically
            seed = self.config.seed if self.config.seed is not None else 0
            self._generator.manual_seed(int(seed) + 7919 + done)
            logger.warning("SACLag learner on %s: no sampling generator state for it in the "
                           "checkpoint; reseeded from seed %s and %d updates.",
                           self._generator.device, seed, done)

    @override(Learner)
    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state[LEARNER_STATE_KEY] = self.get_saclag_state()
        return state

    @override(Learner)
    def set_state(self, state) -> None:
        if not torch.cuda.is_available():
            state = _tensors_to_cpu(state)
        super().set_state(state)
        if LEARNER_STATE_KEY in state:
            self._set_saclag_state(state[LEARNER_STATE_KEY])

    @override(Learner)
    def restore_from_path(self, *args, **kwargs) -> None:
        with _load_pickled_tensors_on_cpu():
            return super().restore_from_path(*args, **kwargs)
