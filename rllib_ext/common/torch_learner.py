"""The torch learner base of CVPO and SACLag: what an off-policy constrained update
needs around its loss.

- build: process tuning (:mod:`cvpo.runtime`), target networks, one sampling
  generator per learner (seeded from the config's seed), per-module update counters;
- optimizers: fused Adam per parameter group (:meth:`register_adam`);
- one host sync per update: a non-finite total loss skips the whole update (no
  optimizer step, no target update), counted in the metrics (:meth:`finish_update`);
- after the optimizer steps, the polyak update of every target network pair;
- metrics logged by name, once per learner call (means over its updates), from one
  stacked tensor per update (:meth:`record_metrics`);
- state: numpy and Python numbers only, so a GPU learner's checkpoint restores on a
  CPU-only machine; the generator's state per device type.

Subclasses write ``compute_loss_for_module``, ``configure_optimizers_for_module`` and
their own per-module state (``_init_module_state``, ``_module_state``,
``_set_module_state``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Any

import numpy as np
import torch
from ray.rllib.core.learner.learner import Learner
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.apis import TargetNetworkAPI
from ray.rllib.utils.annotations import override
from ray.rllib.utils.typing import ModuleID, ParamDict, TensorType

from cvpo.networks import polyak_update, reduce_members
from cvpo.runtime import set_torch_threads, tune_malloc
from rllib_ext.common import metrics as M

logger = logging.getLogger(__name__)

GENERATOR_KEY = "generator"  # + "_<device type>" for a generator that is not on the CPU
_GENERATOR_SEED_OFFSET = 7919


def learner_threads(config) -> int | None:
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


def to_host(tree: Any) -> Any:
    """Every torch tensor in a nested dict / list / tuple -> a numpy array on the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().numpy()
    if isinstance(tree, dict):
        return {k: to_host(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_host(v) for v in tree)
    return tree


def tensors_to_cpu(tree: Any) -> Any:
    """Every torch tensor that is not on the CPU -> its CPU copy (others untouched)."""
    if isinstance(tree, torch.Tensor):
        return tree if tree.device.type == "cpu" else tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: tensors_to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tensors_to_cpu(v) for v in tree)
    return tree


def _load_storage_on_cpu(b: bytes):
    """``torch.storage._load_from_bytes`` with ``map_location="cpu"``."""
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=False)


@contextlib.contextmanager
def load_pickled_tensors_on_cpu():
    """While active, and only where CUDA is not available: pickled torch tensors load
    onto the CPU instead of failing with "Attempting to deserialize object on a CUDA
    device". (A pickled tensor's storage is rebuilt by ``torch.storage._load_from_bytes``,
    which calls ``torch.load`` without a ``map_location``; this is torch's private
    hook, patched only inside this context.)"""
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


def cost_values_at(
    target_critics: torch.nn.Module,
    obs: torch.Tensor,
    actions: torch.Tensor,
    *,
    num_reward_critics: int,
    num_constraints: int,
    num_cost_critics: int,
    reduction: str,
) -> torch.Tensor:
    """(m, B) values of the target cost critics at (obs, actions), one action per state
    (B, d), each constraint's ensemble reduced by ``reduction``. The ensemble holds the
    reward critics first, then ``num_cost_critics`` members per constraint. Call without
    gradients."""
    B = obs.shape[0]
    q = target_critics(obs, actions)  # (M, B)
    E, m, Ec = num_reward_critics, num_constraints, num_cost_critics
    return reduce_members(q[E:].reshape(m, Ec, B), reduction, 1)


def cost_values_at_replay_actions(
    target_critics: torch.nn.Module,
    next_obs: torch.Tensor,
    batch: dict[str, Any],
    fallback: torch.Tensor,
    *,
    num_reward_critics: int,
    num_constraints: int,
    num_cost_critics: int,
    reduction: str,
) -> torch.Tensor:
    """The cost side of the TD target with ``cost_target_actions="replay"``.

    (m, B) values of the target cost critics (each constraint's ensemble reduced by
    ``reduction``) at (s', a') with a' the action the behaviour took in s' (the replay's
    ``next_actions``); ``fallback`` (m, B) where s' has no action (the final observation
    of an episode, ``next_action_valid`` 0). The ensemble holds the reward critics first,
    then ``num_cost_critics`` members per constraint. Call without gradients."""
    B = next_obs.shape[0]
    vc = cost_values_at(
        target_critics,
        next_obs,
        batch["next_actions"].float().reshape(B, -1),
        num_reward_critics=num_reward_critics,
        num_constraints=num_constraints,
        num_cost_critics=num_cost_critics,
        reduction=reduction,
    )
    valid = batch["next_action_valid"].float().reshape(1, B) > 0.5
    return torch.where(valid, vc, fallback)


def adam(params) -> torch.optim.Optimizer:
    """Adam with the fused kernel (one op for all tensors; on CPU ~4x faster per
    step than the default per-tensor loop at CVPO's sizes, measured 0.3 vs 1.4 ms),
    or the multi-tensor path where this torch/device has no fused Adam."""
    try:
        return torch.optim.Adam(params, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, foreach=True)


class ConstrainedTorchLearner(TorchLearner):
    """The torch learner base (see the module docstring)."""

    #: the key of this learner's own state in the Learner state (subclasses set it)
    LEARNER_STATE_KEY = "constrained_learner_state"

    @override(TorchLearner)
    def build(self) -> None:
        tune_malloc()  # keep the update's multi-MB activations on warm heap pages
        threads = learner_threads(self.config)
        if threads is not None:
            set_torch_threads(threads)
        super().build()
        self.module.foreach_module(
            lambda mid, mod: (
                mod.make_target_networks() if isinstance(mod, TargetNetworkAPI) else None
            )
        )
        self._counters: dict[ModuleID, dict[str, int]] = {}
        self._pending: dict[ModuleID, dict[str, Any]] = {}  # per-update metrics to log
        self._skip_update = False
        self._generator = torch.Generator(device=self._device)
        self._generator.manual_seed(self._seed() + _GENERATOR_SEED_OFFSET)
        for mid in self.module.keys():
            self._counters[mid] = {"updates": 0, "skipped": 0}
            self._init_module_state(mid, self.config.get_config_for_module(mid))

    def _seed(self) -> int:
        return int(self.config.seed) if self.config.seed is not None else 0

    def _init_module_state(self, module_id: ModuleID, config) -> None:
        """Creates the subclass's per-module state (multipliers, trust regions, ...)."""

    def register_adam(self, module_id: ModuleID, name: str, params, lr) -> None:
        """Registers one Adam optimizer over ``params`` (see :func:`adam`)."""
        self.register_optimizer(
            module_id=module_id,
            optimizer_name=name,
            optimizer=adam(params),
            params=params,
            lr_or_lr_schedule=lr,
        )

    # -- one update -----------------------------------------------------------------------
    def finish_update(self, module_id: ModuleID, total: torch.Tensor) -> bool:
        """The one host sync per update: True if ``total`` is finite (the update goes
        ahead), False if it is not (the whole update is skipped and counted)."""
        self._skip_update = not bool(torch.isfinite(total))
        self._counters[module_id]["skipped" if self._skip_update else "updates"] += 1
        return not self._skip_update

    def record_metrics(
        self,
        module_id: ModuleID,
        values: dict[str, torch.Tensor],
        host: dict[str, float] | None = None,
    ) -> None:
        """Records one update's metrics by key: a 0-d tensor is logged under its key, a
        1-d tensor of m values under ``key + constraint name``; ``host`` holds Python
        numbers. Logged as means over the learner call's updates (:meth:`_flush`)."""
        record = self._pending.setdefault(module_id, {"rows": [], "host": []})
        if "layout" not in record:
            record["layout"] = [(key, t.numel(), t.dim()) for key, t in values.items()]
        record["rows"].append(torch.cat([t.detach().float().reshape(-1) for t in values.values()]))
        if host:
            record["host"].append(host)

    def _flush(self, module_id: ModuleID) -> None:
        record = self._pending.pop(module_id, None)
        if not record or not record["rows"]:
            return
        names = self.config.get_config_for_module(module_id).constraint_names
        log = self.metrics.log_value
        means = torch.stack(record["rows"]).mean(dim=0).tolist()
        at = 0
        for key, size, dim in record["layout"]:
            if dim == 0:
                log((module_id, key), means[at], window=1)
            else:
                for name, value in zip(names, means[at : at + size]):
                    log((module_id, key + name), value, window=1)
            at += size
        for key in record["host"][0] if record["host"] else ():
            log((module_id, key), float(np.mean([h[key] for h in record["host"]])), window=1)
        counters = self._counters[module_id]
        log((module_id, M.NUM_UPDATES), counters["updates"], window=1)
        log((module_id, M.NUM_SKIPPED_UPDATES), counters["skipped"], window=1)
        self._log_learner_call(module_id)

    def _log_learner_call(self, module_id: ModuleID) -> None:
        """Logs the subclass's once-per-call metrics (state variables, counts)."""

    @override(Learner)
    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        for mid in list(self._pending):
            self._flush(mid)

    @override(TorchLearner)
    def compute_gradients(self, loss_per_module: dict[ModuleID, TensorType], **kwargs) -> ParamDict:
        if self._skip_update:
            for optim in self._optimizer_parameters:
                optim.zero_grad(set_to_none=True)
            return {}
        return super().compute_gradients(loss_per_module, **kwargs)

    @override(TorchLearner)
    def apply_gradients(self, gradients_dict: ParamDict) -> None:
        if self._skip_update:
            return
        # The loss was checked finite (finish_update); stepping without RLlib's
        # per-tensor isfinite checks saves one host sync per parameter tensor.
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
    # CPU-only machine. The sampling generator lives on the learner's device; its state
    # is stored under "generator" (CPU) or "generator_<device type>" (e.g.
    # "generator_cuda": a CUDA generator's state cannot seed a CPU one). A learner that
    # finds no state for its own device type reseeds deterministically.
    def _module_state(self, module_id: ModuleID) -> dict[str, Any]:
        """The subclass's per-module state (numpy and Python numbers)."""
        return {}

    def _set_module_state(self, module_id: ModuleID, state: dict[str, Any]) -> None:
        """Restores what :meth:`_module_state` returned."""

    def _generator_key(self) -> str:
        kind = self._generator.device.type
        return GENERATOR_KEY if kind == "cpu" else f"{GENERATOR_KEY}_{kind}"

    def learner_state(self) -> dict[str, Any]:
        """The generator, and per module the counters and the subclass's state."""
        out: dict[str, Any] = {self._generator_key(): self._generator.get_state().cpu().numpy()}
        for mid in self.module.keys():
            out[mid] = {**to_host(self._module_state(mid)), "counters": dict(self._counters[mid])}
        return out

    def set_learner_state(self, state: dict[str, Any]) -> None:
        state = to_host(state)  # tensors of any device (older checkpoints) -> numpy
        done = 0
        for mid in self.module.keys():
            if mid in state and isinstance(state[mid], dict):
                self._counters[mid] = dict(state[mid]["counters"])
                done += int(self._counters[mid].get("updates", 0))
                self._set_module_state(mid, state[mid])
        key = self._generator_key()
        if key in state:
            self._generator.set_state(torch.as_tensor(np.asarray(state[key]), dtype=torch.uint8))
            return
        # e.g. a GPU learner's checkpoint restored on a CPU-only machine: its CUDA
        # generator state cannot drive a CPU generator. Reseed from the seed and the
        # number of updates done, so the restore is deterministic.
        self._generator.manual_seed(self._seed() + _GENERATOR_SEED_OFFSET + done)
        stored = sorted(k for k in state if isinstance(k, str) and k.startswith(GENERATOR_KEY))
        if stored:
            logger.warning(
                "%s on %s: the checkpoint holds the sampling generator state for %s only; "
                "reseeded it from seed %s and %d updates.",
                type(self).__name__,
                self._generator.device,
                ", ".join(stored),
                self._seed(),
                done,
            )

    @override(Learner)
    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state[self.LEARNER_STATE_KEY] = self.learner_state()
        return state

    @override(Learner)
    def set_state(self, state) -> None:
        if not torch.cuda.is_available():
            state = tensors_to_cpu(state)  # a GPU learner's tensors, on a CPU-only machine
        super().set_state(state)
        if self.LEARNER_STATE_KEY in state:
            self.set_learner_state(state[self.LEARNER_STATE_KEY])

    @override(Learner)
    def restore_from_path(self, *args, **kwargs) -> None:
        # A checkpoint whose pickles hold CUDA tensors (older GPU runs) loads on a
        # CPU-only machine with the tensors mapped to the CPU.
        with load_pickled_tensors_on_cpu():
            return super().restore_from_path(*args, **kwargs)
