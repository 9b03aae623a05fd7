"""Reading an RLModule's ``model_config``: every key is required.

The algorithm configs fill the model config (``_model_config_auto_includes``) from
their own keys, whose defaults live in the config classes and :mod:`cvpo.defaults`;
a module never falls back to a default of its own, so the two cannot disagree.
"""

from __future__ import annotations

from typing import Any


def model_setting(model_config: dict, key: str, algo: str) -> Any:
    """``model_config[key]``, or a KeyError that names the key and where it comes from."""
    try:
        return model_config[key]
    except KeyError:
        raise KeyError(
            f"the {algo} module's model_config has no {key!r}: build the module from a "
            f"{algo}Config (its _model_config_auto_includes fills every key the module "
            "reads), or pass all of them in model_config"
        ) from None
