"""The learner benchmark's arithmetic count (benchmarks/learner.py: update_gflop)."""

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "learner.py"
_spec = importlib.util.spec_from_file_location("learner_benchmark", _PATH)
lb = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("learner_benchmark", lb)
_spec.loader.exec_module(lb)


def test_unit_sizes_count_every_multiply_add_twice():
    # one state, one action, width 1: E-step 4 terms x 2 = 8; target 2-layer MLP
    # 2 * (2 + 1 + 1) = 8; critic training 3 x 8 = 24; actor (2 outputs) 5 x 2 * (1 + 1 + 2)
    # = 40; 80 FLOP in all
    got = lb.update_gflop(1, 1, 1, 1, hidden=1, critics=1, target_actions=1)
    assert got == pytest.approx(80e-9)


def test_the_estep_hidden_layer_dominates_at_the_reference_sizes():
    total = lb.update_gflop(256, 16, 60, 2, hidden=128, critics=2)
    estep_hidden = 2 * 2 * 256 * 16 * 128 * 128 / 1e9
    assert 0.4 < total < 0.5
    assert estep_hidden / total > 0.55
    # K sampled actions scale the E-step, not the rest
    assert lb.update_gflop(256, 32, 60, 2) - total == pytest.approx(
        2 * (2 * 256 * 16 * (2 * 128 + 128 * 128 + 128)) / 1e9
    )
