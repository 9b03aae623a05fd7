"""The ``rllib`` command (Ray 2.60 ships none): train, train file, resume, evaluate, report.

Shape of the CLI Ray last shipped in 2.40::

    rllib train --algo CVPO --env SafetyPointGoal1-v0 [--config JSON] [--stop JSON]
    rllib train file tuned_examples/cvpo/point_hazard.yaml
    rllib resume ~/ray_results/EXPERIMENT
    rllib evaluate CHECKPOINT [--env ID] [--episodes N] [--render OUT.gif]
    rllib report EXPERIMENT_DIR

One module per command (:mod:`~rllib_ext.cli.train`,
:mod:`~rllib_ext.cli.experiment_file`, :mod:`~rllib_ext.cli.resume`,
:mod:`~rllib_ext.cli.evaluate`, :mod:`~rllib_ext.cli.report`), what they share
in :mod:`~rllib_ext.cli.common`. Everything runs on a local Ray by default
(``--ray-address`` joins a cluster).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from rllib_ext.checkpoints import CheckpointError
from rllib_ext.cli import evaluate, experiment_file, report, resume, train
from rllib_ext.cli.common import EPILOG, CLIError
from rllib_ext.cli.report import ReportError
from rllib_ext.cli.train import resolve_algorithm

HANDLERS = {
    "train": train.cmd_train,
    "train file": experiment_file.cmd_train_file,
    "resume": resume.cmd_resume,
    "evaluate": evaluate.cmd_evaluate,
    "report": report.cmd_report,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``rllib`` parser with its subcommands (``train file`` has its own parser)."""
    parser = argparse.ArgumentParser(
        prog="rllib",
        description="Train and evaluate RLlib algorithms (CVPO, PPO, SAC, ...) on constrained "
        "tasks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,train file,resume,evaluate,report}")
    for command in (train, resume, evaluate, report):
        command.add_parser(sub)
    return parser


build_train_file_parser = experiment_file.build_parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["train", "file"]:
        args = build_train_file_parser().parse_args(argv[2:])
        args.command = "train file"
    else:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
    t0 = time.time()
    try:
        return HANDLERS[args.command](args)
    except (CLIError, CheckpointError, ReportError) as err:
        print(f"rllib {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        dirs = getattr(args, "experiment_dirs", [])
        again = f"; continue with `rllib resume {dirs[-1]}`" if dirs else ""
        print(
            f"\ninterrupted after {time.time() - t0:.0f}s; results so far are kept{again}",
            file=sys.stderr,
        )
        return 130


__all__ = ["CLIError", "build_parser", "build_train_file_parser", "main", "resolve_algorithm"]
