"""Checkpoints of this project's algorithms (and of any new-API-stack RLlib one).

One home for what touches a checkpoint folder outside the learner:

* :class:`CheckpointError`, the one-line error for a checkpoint that is
  missing, not an RLlib one, damaged, or another algorithm's;
* paths: :func:`absolute_checkpoint_path` (pyarrow fails on relative paths)
  and :func:`resolve_checkpoint_dir` (a checkpoint, or a trial folder: its
  newest checkpoint);
* checks: :func:`check_algorithm_checkpoint` (exists, complete pickles, the
  expected algorithm), used by ``ConstrainedOffPolicy.from_checkpoint``;
* loading without Ray: :func:`load_checkpoint_config` and :func:`load_module`
  (``rllib evaluate``);
* the best feasible checkpoint's folder: :func:`best_feasible_target`.

Loading a learner's GPU tensors on a CPU machine is the learner's business
(``rllib_ext/cvpo/torch/cvpo_torch_learner.py``).

Security: checkpoints are pickles. Load only checkpoints you trust.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

#: the pickle that names a checkpoint's Algorithm class and its config
CLASS_FILE = "class_and_ctor_args.pkl"
#: the policy RLModule inside an Algorithm checkpoint
MODULE_SUBDIR = Path("learner_group") / "learner" / "rl_module" / "default_policy"

_WRITTEN_BY = "written by Algorithm.save() or `rllib train`"


class CheckpointError(ValueError):
    """A checkpoint that does not exist, is not an RLlib one, or is damaged."""


def _first_line(err: BaseException) -> str:
    text = str(err)
    return text.splitlines()[0] if text else ""


def absolute_checkpoint_path(path: Any) -> Any:
    """``path`` made absolute when it is a local path without a URI scheme.

    RLlib opens checkpoints through pyarrow, which reads a relative path as a
    URI with an empty scheme and fails (``ArrowInvalid``). URIs (``s3://``),
    ``ray.tune.Checkpoint`` objects and other values are returned unchanged.
    """
    if isinstance(path, (str, os.PathLike)):
        text = os.fspath(path)
        if isinstance(text, str) and "://" not in text:
            return os.path.abspath(os.path.expanduser(text))
    return path


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint folder for ``path`` (a checkpoint, or a trial folder: its newest).

    Returned absolute (see :func:`absolute_checkpoint_path`).
    """
    p = Path(os.path.abspath(Path(path).expanduser()))
    if not p.exists():
        raise CheckpointError(
            f"checkpoint path {p} does not exist; pass the checkpoint_XXXXXX folder "
            "printed at the end of `rllib train`"
        )
    if not (p / CLASS_FILE).exists():
        found = sorted(p.glob("checkpoint_*"))
        if found and (found[-1] / CLASS_FILE).exists():
            return found[-1]
        raise CheckpointError(
            f"{p} is not an RLlib checkpoint (no {CLASS_FILE}); pass a checkpoint_XXXXXX "
            "folder written by `rllib train` or Algorithm.save()"
        )
    return p


def pickle_complete(path: Path) -> bool:
    """A pickle written in full ends with the STOP opcode (b'.'); a cut-off one does not."""
    try:
        size = path.stat().st_size
        if size == 0:
            return False
        with open(path, "rb") as f:
            f.seek(size - 1)
            return f.read(1) == b"."
    except OSError:
        return False


def check_algorithm_checkpoint(path: Any, expected_cls: type | None = None) -> type | None:
    """Clear errors for a checkpoint that cannot be restored as ``expected_cls``.

    Checks a local checkpoint folder (remote URIs are left to RLlib): it
    exists, is an RLlib new-stack checkpoint, its pickles are complete, and
    the algorithm stored in it is ``expected_cls`` (or a subclass). Returns the
    stored algorithm class (None for a URI that was not checked).

    Raises:
        CheckpointError (a ValueError): one line naming the path and what to do.
    """
    path = getattr(path, "path", path)  # a ray.tune.Checkpoint
    text = os.fspath(path)
    if "://" in text:
        return None
    p = Path(text).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"checkpoint path {p} does not exist; pass a checkpoint_XXXXXX folder {_WRITTEN_BY}"
        )
    if not (p / CLASS_FILE).is_file():
        found = sorted(x for x in p.glob("checkpoint_*") if (x / CLASS_FILE).is_file())
        hint = (
            f"; it holds checkpoints, did you mean {found[-1]}?"
            if found
            else f"; pass a checkpoint_XXXXXX folder {_WRITTEN_BY}"
        )
        raise CheckpointError(f"{p} is not an RLlib checkpoint (no {CLASS_FILE}){hint}")
    try:
        with open(p / CLASS_FILE, "rb") as f:
            stored = pickle.load(f)["class"]
    except (ImportError, AttributeError) as err:
        raise CheckpointError(
            f"checkpoint {p} was written by an algorithm that cannot be imported here "
            f"({type(err).__name__}: {err}); install the package that defines it"
        ) from None
    except Exception as err:  # noqa: BLE001 (any other unpickling failure means damage)
        raise CheckpointError(
            f"checkpoint {p} is damaged ({CLASS_FILE}: {type(err).__name__}: "
            f"{_first_line(err)}); use an earlier checkpoint of the run"
        ) from None
    if expected_cls is not None and not (
        isinstance(stored, type) and issubclass(stored, expected_cls)
    ):
        name = getattr(stored, "__name__", repr(stored))
        raise CheckpointError(
            f"checkpoint {p} was written by {name}, not {expected_cls.__name__}; restore it with "
            f"{name}.from_checkpoint(...) (or ray.rllib.algorithms.Algorithm.from_checkpoint), "
            f"or pass a {expected_cls.__name__} checkpoint"
        )
    broken = [str(f.relative_to(p)) for f in sorted(p.rglob("*.pkl")) if not pickle_complete(f)]
    if broken:
        raise CheckpointError(
            f"checkpoint {p} is damaged: {', '.join(broken)} "
            f"{'is' if len(broken) == 1 else 'are'} cut off or empty; use an earlier checkpoint "
            "of the run"
        )
    return stored


def load_checkpoint_config(ckpt: Path):
    """(Algorithm class, AlgorithmConfig) stored in a checkpoint.

    Unpickling imports the algorithm's module (for CVPO and SACLag that
    imports, and so registers, :mod:`rllib_ext`).
    """
    try:
        with open(ckpt / CLASS_FILE, "rb") as f:
            data = pickle.load(f)
        algo_cls = data["class"]
        args, _ = data["ctor_args_and_kwargs"]
        config_state = args[0]
    except Exception as err:  # noqa: BLE001 (any unpickling failure means damage)
        raise CheckpointError(
            f"checkpoint {ckpt} is damaged ({type(err).__name__}: {err}); "
            "use an earlier checkpoint of the run"
        ) from None
    config = algo_cls.get_default_config()
    if isinstance(config_state, dict):
        if "class" in config_state:
            config = type(config).from_state(config_state)
        else:
            config = config.update_from_dict(config_state)
    else:
        config = config_state
    return algo_cls, config


def load_module(ckpt: Path):
    """The RLModule (policy) stored in a checkpoint, on CPU, in eval mode."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    path = ckpt / MODULE_SUBDIR
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {ckpt} holds no policy module at {MODULE_SUBDIR}; it was not written "
            "by a new-API-stack algorithm, or it is incomplete"
        )
    try:
        module = RLModule.from_checkpoint(path)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(
            f"could not load the policy of checkpoint {ckpt} ({type(err).__name__}: "
            f"{_first_line(err)}); the checkpoint is damaged"
        ) from None
    module.eval()
    return module


def best_feasible_target(algorithm) -> tuple[str, Any]:
    """(folder, pyarrow filesystem or None) of an Algorithm's best feasible checkpoint.

    The folder is ``algorithm.best_feasible_path`` when set (a local path),
    else ``best_feasible`` (``metrics.BEST_FEASIBLE_DIR``) in the trial folder
    under Tune (on Tune's storage filesystem), or in the Algorithm's logdir
    without Tune.
    """
    from rllib_ext.common.metrics import BEST_FEASIBLE_DIR

    own = getattr(algorithm, "best_feasible_path", None)
    if own:
        return own, None
    storage = getattr(algorithm, "_storage", None)
    if storage is None:
        return os.path.join(algorithm.logdir, BEST_FEASIBLE_DIR), None
    return os.path.join(storage.trial_fs_path, BEST_FEASIBLE_DIR), storage.storage_filesystem
