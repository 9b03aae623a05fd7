"""``rllib train file FILE.yaml``: run a Tune experiment file.

The file maps experiment names to specs ``{run, env, config, stop, ...}``;
:func:`normalize_experiment` keeps only the keys :data:`EXPERIMENT_KEYS`
names, moves Tune's old key names to their current place and refuses the rest
with one line naming the supported keys.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

from rllib_ext.cli.common import EPILOG, RESULTS_EPILOG, CLIError
from rllib_ext.cli.train import add_run_args, run_experiments

# Keys of one experiment in a Tune experiment file that `rllib train file` honours.
EXPERIMENT_KEYS = {
    "run": "the algorithm: CVPO, PPO, SAC, ...",
    "env": "the env id (or config.env)",
    "config": "the algorithm config",
    "stop": "stop criteria, e.g. {training_iteration: 100}",
    "checkpoint_config": "when to checkpoint (see its keys)",
    "num_samples": "repeat each trial N times",
    "storage_path": "where results go",
    "max_concurrent_trials": "run at most N trials at a time",
    "max_failures": "restart a failed trial from its last checkpoint up to N times",
}
CHECKPOINT_KEYS = (
    "checkpoint_frequency",
    "checkpoint_at_end",
    "num_to_keep",
    "checkpoint_score_attribute",
    "checkpoint_score_order",
)
# Older Tune / RLlib names users still write: (section or None for the top level, key).
LEGACY_KEYS = {
    "algo": (None, "run"),
    "local_dir": (None, "storage_path"),
    "checkpoint_freq": ("checkpoint_config", "checkpoint_frequency"),
    "checkpoint_at_end": ("checkpoint_config", "checkpoint_at_end"),
    "keep_checkpoints_num": ("checkpoint_config", "num_to_keep"),
    "checkpoint_score_attr": ("checkpoint_config", "checkpoint_score_attribute"),
}
# Keys that cannot be honoured here, with what to do instead.
REFUSED_KEYS = {
    "name": "the experiment's name is its key in the file (or pass --experiment-name)",
    "resources_per_trial": "RLlib sizes a trial from its config "
    "(num_env_runners, num_gpus_per_learner, ...)",
    "resume": "run `rllib resume <storage>/<experiment>` or pass --resume",
    "restore": "run `rllib resume <storage>/<experiment>` or pass --resume",
    "callbacks": "algorithm callbacks go in config: {callbacks: ...}",
}
# Integer keys and their smallest allowed value.
INTEGER_KEYS = (
    ("num_samples", 1),
    ("max_concurrent_trials", 1),
    ("max_failures", -1),
    ("checkpoint_frequency", 0),
    ("num_to_keep", 1),
)


def build_parser() -> argparse.ArgumentParser:
    """``rllib train file FILE.yaml`` (a parser of its own: argparse has no two-word commands)."""
    p = argparse.ArgumentParser(
        prog="rllib train file",
        description="Run a Tune experiment file: {name: {run: ALGO, env: ID, config: {...}, "
        "stop: {...}, ...}}. Keys: "
        + ", ".join(EXPERIMENT_KEYS)
        + "; checkpoint_config keys: "
        + ", ".join(CHECKPOINT_KEYS)
        + ". Flags given here override the file's values.",
        epilog=EPILOG + "\n" + RESULTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="YAML experiment file")
    add_run_args(p)
    return p


def load_experiment_file(path: str) -> dict[str, dict[str, Any]]:
    """Reads a Tune experiment YAML; errors name the file and line."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"experiment file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise CLIError(f"YAML syntax error in {where}: {problem}") from None
    if not isinstance(data, dict) or not data:
        raise CLIError(
            f"{path}: expected a mapping {{experiment_name: {{run: ..., env: ..., config: ...}}}}"
        )
    return {name: normalize_experiment(name, spec, path) for name, spec in data.items()}


def _unknown_key(key: str, known, where: str, what: str) -> CLIError:
    close = difflib.get_close_matches(key, list(known) + list(LEGACY_KEYS), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return CLIError(f"{where}: unknown {what} {key!r}{hint}; supported keys: {', '.join(known)}")


def normalize_experiment(name: str, spec: Any, path: str) -> dict[str, Any]:
    """One experiment of a file with only the keys :func:`run_experiments` honours.

    Old Tune names (``checkpoint_freq``, ``checkpoint_at_end``,
    ``keep_checkpoints_num``, ``checkpoint_score_attr``, ``local_dir``) are
    moved to their current place with a note on stderr; any other key is
    refused with a one-line CLIError naming the supported keys.
    """
    where = f"{path}: experiment {name!r}"
    if not isinstance(spec, dict):
        raise CLIError(
            f"{where} must be a mapping {{run: ..., env: ..., config: ...}}, got {spec!r}"
        )
    out: dict[str, Any] = {}
    ckpt_in = spec.get("checkpoint_config", {}) or {}
    if not isinstance(ckpt_in, dict):
        raise CLIError(
            f"{where}: checkpoint_config must be a mapping with keys {', '.join(CHECKPOINT_KEYS)}"
        )
    ckpt: dict[str, Any] = {}
    origin: dict[Any, str] = {}  # (section, key) -> the label it was written as
    notes: list[str] = []
    moves = [(None, k, v) for k, v in spec.items() if k != "checkpoint_config"]
    moves += [("checkpoint_config", k, v) for k, v in ckpt_in.items()]
    for section, key, value in moves:
        label = key if section is None else f"{section}.{key}"
        legacy = LEGACY_KEYS.get(key)
        if legacy and legacy != (section, key) and section in (None, legacy[0]):
            new_section, new_key = legacy
            new_label = new_key if new_section is None else f"{new_section}.{new_key}"
            if key != "algo":
                notes.append(
                    f"note: {where}: `{label}` is Tune's old name for `{new_label}`; "
                    "using it as that"
                )
            if new_key == "checkpoint_score_attribute" and str(value).startswith("min-"):
                value = str(value)[4:]
                ckpt.setdefault("checkpoint_score_order", "min")
            section, key = new_section, new_key
        elif section is None and key in REFUSED_KEYS:
            raise CLIError(f"{where}: key {key!r} is not supported here: {REFUSED_KEYS[key]}")
        elif section is None and key not in EXPERIMENT_KEYS:
            raise _unknown_key(key, EXPERIMENT_KEYS, where, "key")
        elif section == "checkpoint_config" and key not in CHECKPOINT_KEYS:
            raise _unknown_key(key, CHECKPOINT_KEYS, where, "checkpoint_config key")
        target = out if section is None else ckpt
        if key in target and target[key] != value:
            first = origin[(section, key)]
            current = key if section is None else f"{section}.{key}"
            raise CLIError(
                f"{where}: {first!r} ({target[key]!r}) and {label!r} ({value!r}) set "
                f"the same thing differently; keep only {current!r}"
            )
        target[key] = value
        origin[(section, key)] = label
    if ckpt:
        out["checkpoint_config"] = ckpt
    if not out.get("run"):
        raise CLIError(f"{where} needs a `run:` key naming the algorithm")
    for key in ("config", "stop"):
        if out.get(key) is not None and not isinstance(out[key], dict):
            raise CLIError(f"{where}: `{key}` must be a mapping, got {out[key]!r}")
    for key, low in INTEGER_KEYS:
        value = (ckpt if key in CHECKPOINT_KEYS else out).get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < low
        ):
            raise CLIError(f"{where}: `{key}` must be an integer >= {low}, got {value!r}")
    for note in notes:
        print(note, file=sys.stderr)
    return out


def cmd_train_file(args) -> int:
    experiments = load_experiment_file(args.file)
    if args.experiment_name:
        if len(experiments) != 1:
            raise CLIError(
                f"--experiment-name renames the experiment of a file with one, but {args.file} "
                f"has {len(experiments)} ({', '.join(map(str, experiments))}); drop the flag or "
                "split the file"
            )
        (spec,) = experiments.values()
        experiments = {args.experiment_name: spec}
    return run_experiments(experiments, args)
