"""CVPO's per-module learner state, free of any deep-learning framework (as RLlib keeps
``sac_learner.py`` next to ``torch/sac_torch_learner.py``).

Per module: the M-step trust region (the multipliers alpha_mu, alpha_sigma and their
updates, :class:`cvpo.mstep.TrustRegion`), the last E-step dual solution (the warm
start of the next solve), and the per-step cost thresholds the Algorithm pushes after
every finished training episode (docs/algorithm.md#per-step-threshold). The update
itself is in :mod:`rllib_ext.cvpo.torch.cvpo_torch_learner`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.rllib.core.learner.learner import Learner
from ray.rllib.utils.typing import ModuleID

from cvpo import estep
from cvpo.mstep import TrustRegion
from rllib_ext.common import metrics as M

LEARNER_STATE_KEY = "cvpo_learner_state"
_STATUSES = (estep.STATUS_CONVERGED, estep.STATUS_MAX_ITER, estep.STATUS_INFEASIBLE)


class CVPOLearner(Learner):
    """Trust regions, dual warm starts and step thresholds, per module."""

    LEARNER_STATE_KEY = LEARNER_STATE_KEY

    def _init_module_state(self, module_id: ModuleID, config) -> None:
        if not hasattr(self, "_trust"):
            self._trust: dict[ModuleID, TrustRegion] = {}
            self._dual: dict[ModuleID, tuple | None] = {}
            self._thresholds: dict[ModuleID, np.ndarray] = {}
            self._statuses: dict[ModuleID, list[tuple[str, bool]]] = {}
        self._trust[module_id] = TrustRegion(
            eps_mu=config.mstep_kl_mu,
            eps_sigma=config.mstep_kl_sigma,
            alpha_lr=config.mstep_alpha_lr,
            alpha_mu_max=config.alpha_mu_max,
            alpha_sigma_max=config.alpha_sigma_max,
        )
        self._dual[module_id] = None
        self._statuses[module_id] = []

    # -- the E-step's cost thresholds (the Algorithm adapts them: cvpo.threshold) ----------
    def step_thresholds(self, module_id: ModuleID) -> np.ndarray:
        """The per-step cost thresholds the E-step uses now (one per constraint)."""
        if module_id not in self._thresholds:
            config = self.config.get_config_for_module(module_id)
            self._thresholds[module_id] = config.step_thresholds()
        return self._thresholds[module_id]

    def set_step_thresholds(self, module_id: ModuleID, thresholds) -> None:
        """Sets the E-step's per-step cost thresholds (called by the Algorithm)."""
        self._thresholds[module_id] = np.asarray(thresholds, np.float64).reshape(-1)

    # -- after an update ----------------------------------------------------------------
    def accept_update(self, module_id: ModuleID, dual: estep.EStepResult, kl_mu, kl_sigma) -> None:
        """Keeps the dual solution as the next warm start and steps the trust region's
        multipliers (only for an update that went ahead)."""
        self._dual[module_id] = (dual.eta, dual.lambdas)
        self._trust[module_id].update(kl_mu, kl_sigma)

    def record_dual(self, module_id: ModuleID, dual: estep.EStepResult) -> None:
        """Counts the solve's status (summed per learner call in the metrics)."""
        self._statuses[module_id].append((dual.status, bool(dual.fallback)))

    def _log_learner_call(self, module_id: ModuleID) -> None:
        """State variables (last values) and the E-step status counts of the call."""
        log = self.metrics.log_value
        names = self.config.get_config_for_module(module_id).constraint_names
        dual = self._dual[module_id]
        if dual is not None:
            eta, lambdas = dual
            log((module_id, M.ETA), float(eta), window=1)
            for name, value in zip(names, np.asarray(lambdas, dtype=np.float64).reshape(-1)):
                log((module_id, M.LAMBDA_PREFIX + name), float(value), window=1)
        for name, threshold in zip(names, self.step_thresholds(module_id)):
            if np.isfinite(threshold):  # inf (constraint off) upsets TensorBoard loggers
                log((module_id, M.STEP_THRESHOLD_PREFIX + name), float(threshold), window=1)
        trust = self._trust[module_id]
        log((module_id, M.ALPHA_MU), float(trust.alpha_mu), window=1)
        log((module_id, M.ALPHA_SIGMA), float(trust.alpha_sigma), window=1)
        statuses, self._statuses[module_id] = self._statuses[module_id], []
        for status in _STATUSES:
            hits = sum(s == status or s.endswith(":" + status) for s, _ in statuses)
            log((module_id, M.ESTEP_STATUS_PREFIX + status), hits, reduce="sum")
        log((module_id, M.ESTEP_FALLBACKS), sum(f for _, f in statuses), reduce="sum")

    # -- checkpoint state (numpy and Python numbers only) ---------------------------------
    def _module_state(self, module_id: ModuleID) -> dict[str, Any]:
        dual = self._dual.get(module_id)
        return {
            "dual": None
            if dual is None
            else (float(np.asarray(_host(dual[0]))), np.asarray(_host(dual[1]), np.float64)),
            "trust_region": self._trust[module_id].state_dict(),
        }

    def _set_module_state(self, module_id: ModuleID, state: dict[str, Any]) -> None:
        self._dual[module_id] = (
            None
            if state["dual"] is None
            else (np.float64(state["dual"][0]), np.asarray(state["dual"][1], np.float64))
        )
        self._trust[module_id].load_state_dict(state["trust_region"])

    def get_cvpo_state(self) -> dict[str, Any]:
        """eta, lambdas, alphas and counters (for tests and diagnostics)."""
        return self.learner_state()


def _host(value: Any) -> Any:
    """A tensor of any framework -> its host value (anything with ``.cpu()``)."""
    return value.detach().cpu() if hasattr(value, "detach") else value
