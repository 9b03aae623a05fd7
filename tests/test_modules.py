"""The RLModules read every model_config key they need, and fail loudly on a missing one."""

import gymnasium as gym
import numpy as np
import pytest
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rllib_ext.cvpo import CVPOConfig
from rllib_ext.cvpo.torch.default_cvpo_torch_rl_module import DefaultCVPOTorchRLModule
from rllib_ext.sac_lag import SACLagConfig
from rllib_ext.sac_lag.torch.default_sac_lag_torch_rl_module import DefaultSACLagTorchRLModule

OBS = gym.spaces.Box(-1.0, 1.0, (5,), np.float32)
ACT = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)


def _build(module_class, model_config):
    spec = RLModuleSpec(
        module_class=module_class,
        observation_space=OBS,
        action_space=ACT,
        model_config=model_config,
    )
    return spec.build()


@pytest.mark.parametrize(
    "config_class, module_class",
    [(CVPOConfig, DefaultCVPOTorchRLModule), (SACLagConfig, DefaultSACLagTorchRLModule)],
)
def test_module_built_from_its_config_and_refuses_a_missing_key(config_class, module_class):
    config = config_class().training(actor_hiddens=[32, 16], num_cost_critics=2)
    model_config = dict(config._model_config_auto_includes)
    module = _build(module_class, model_config)
    assert [
        layer.out_features for layer in module.actor.modules() if hasattr(layer, "out_features")
    ][:2] == [32, 16]
    assert module.num_cost_critics == 2
    assert module.actor.std_max == config.std_max  # one default: the config's
    del model_config["critic_hiddens"]
    with pytest.raises(KeyError, match="critic_hiddens"):
        _build(module_class, model_config)
