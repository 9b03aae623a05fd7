"""``rllib resume EXPERIMENT_DIR``: continue an interrupted experiment from its checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from rllib_ext.cli import common
from rllib_ext.cli.common import RESULTS_EPILOG, CLIError, local_abspath
from rllib_ext.cli.train import report_results, resolve_algorithm


def add_parser(sub) -> None:
    """``rllib resume`` on the subcommands of the main parser."""
    res = sub.add_parser(
        "resume",
        help="resume an interrupted experiment from its checkpoints",
        description="Continue an interrupted experiment (Ctrl-C, a killed driver, a lost node): "
        "unfinished trials restart from their newest checkpoint, errored ones too; finished "
        "trials are kept. The algorithm is read from the experiment folder.",
        epilog=RESULTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    res.add_argument(
        "experiment_dir", help="the experiment folder, <storage>/<experiment> (holds tuner.pkl)"
    )
    res.add_argument(
        "--restart-errored",
        action="store_true",
        help="restart errored trials from scratch instead of from their last checkpoint",
    )
    res.add_argument(
        "--plot", default=None, help="write reward/cost per iteration to this PNG (one trial only)"
    )
    res.add_argument("-v", action="count", default=0, help="more output (-vv: Tune's own tables)")
    common.add_ray_args(res)


def read_trainable_name(experiment_dir: str) -> str:
    """The trainable (algorithm) name stored in an experiment folder's ``tuner.pkl``."""
    import pyarrow.fs
    from ray import cloudpickle

    import rllib_ext  # noqa: F401  (unpickling may need CVPO)

    if "://" in experiment_dir:
        fs, fs_path = pyarrow.fs.FileSystem.from_uri(experiment_dir)
    else:
        fs, fs_path = pyarrow.fs.LocalFileSystem(), experiment_dir
        p = Path(experiment_dir)
        if not p.is_dir():
            raise CLIError(f"experiment folder {p} does not exist")
        if not (p / "tuner.pkl").is_file():
            hint = (
                f"; it looks like a trial folder, did you mean {p.parent}?"
                if (p.parent / "tuner.pkl").is_file()
                else "; pass <storage>/<experiment>, the folder `rllib train` printed after '->'"
            )
            raise CLIError(f"{p} is not a Tune experiment folder (no tuner.pkl){hint}")
    try:
        with fs.open_input_file(f"{fs_path.rstrip('/')}/tuner.pkl") as f:
            state = cloudpickle.loads(f.readall())
        name = state["__trainable_name"]
    except Exception as err:  # noqa: BLE001 (unreadable or cut-off state)
        raise CLIError(
            f"cannot read the experiment state {experiment_dir}/tuner.pkl "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    if not name:
        raise CLIError(
            f"{experiment_dir}/tuner.pkl names no trainable; resume it with tune.Tuner.restore"
        )
    return name


def cmd_resume(args) -> int:
    from ray import tune

    exp_dir = local_abspath(args.experiment_dir)
    algo_cls = resolve_algorithm(read_trainable_name(exp_dir))
    args.experiment_dirs = [exp_dir]
    common.init_ray(args)
    print(f"== resuming {exp_dir}: {algo_cls.__name__}", flush=True)
    for path in common.repair_trial_logs(exp_dir):
        print(f"cut a partial last line off {path} (kept in {path}.partial)", flush=True)
    tuner = tune.Tuner.restore(
        exp_dir,
        trainable=algo_cls,
        resume_unfinished=True,
        resume_errored=not args.restart_errored,
        restart_errored=args.restart_errored,
    )
    return report_results(tuner.fit(), args, algo_cls.__name__, exp_dir)
