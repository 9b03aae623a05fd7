"""num_learners: CVPO's learner state (duals, trust-region multipliers) is per learner,
so more than one data-parallel learner is refused with one clear line."""

import pytest

from cvpo.envs import POINT_HAZARD_ID
from rllib_ext.cvpo import CVPOConfig
from rllib_ext.cvpo.validation import CVPOConfigError


def _config(num_learners):
    return (
        CVPOConfig()
        .environment(POINT_HAZARD_ID)
        .env_runners(num_env_runners=0)
        .learners(num_learners=num_learners)
    )


@pytest.mark.parametrize("n", [2, 4])
def test_more_than_one_learner_is_refused(n):
    with pytest.raises(CVPOConfigError) as excinfo:
        _config(n).validate()
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert f"`num_learners`={n}" in msg
    assert "use num_learners=0" in msg and "or 1" in msg
    for why in ("eta, lambda", "alpha_mu, alpha_sigma", "diverge"):
        assert why in msg, why
    assert excinfo.value.__cause__ is None


@pytest.mark.parametrize("n", [0, 1])
def test_zero_or_one_learner_validates(n):
    cfg = _config(n)
    cfg.validate()
    assert cfg.num_learners == n
    assert cfg.episode_horizon == 100  # the env was probed: validation went to the end
