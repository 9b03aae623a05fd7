"""RLlib integration for CVPO.

Importing this package registers the algorithm "CVPO" with Ray Tune (so
``tune.Tuner("CVPO", ...)`` and YAML experiment files find it) and every env
id that :func:`cvpo.envs.make_env` accepts.
"""

from ray.tune.registry import register_trainable

from rllib_ext.cvpo import CVPO, CVPOConfig
from rllib_ext.envs import register_all

register_trainable("CVPO", CVPO)
register_all()

__all__ = ["CVPO", "CVPOConfig"]
