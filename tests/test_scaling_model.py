"""The scaling model's arithmetic (benchmarks/scaling_model.py): numbers in, numbers out."""

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling_model.py"
_spec = importlib.util.spec_from_file_location("scaling_model", _PATH)
sm = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("scaling_model", sm)  # dataclasses look their module up there
_spec.loader.exec_module(sm)

# r = 100 env steps/s per runner; u = 50 updates/s; no ingest or sync cost:
# at ratio 0.2 the learner can take 50 / 0.2 = 250 env steps/s.
PLAIN = sm.Inputs(runner_env_steps_per_s=100.0, learner_updates_per_s=50.0, ingest_s_per_env_step=0)


def test_sampling_binds_below_the_learner_capacity_and_the_learner_above():
    p1 = sm.predict(PLAIN, 1, ratio=0.2)
    assert p1["env_steps_per_s"] == pytest.approx(100.0)
    assert p1["updates_per_s"] == pytest.approx(20.0)
    assert p1["bottleneck"] == "sampling"
    assert sm.predict(PLAIN, 2, ratio=0.2)["bottleneck"] == "sampling"
    p3 = sm.predict(PLAIN, 3, ratio=0.2)
    assert p3["env_steps_per_s"] == pytest.approx(250.0)
    assert p3["updates_per_s"] == pytest.approx(50.0)
    assert p3["bottleneck"] == "learner"
    assert sm.runners_to_saturate_learner(PLAIN, 0.2) == 3
    # a smaller update ratio moves the switch: the learner takes 500 env steps/s at 0.1
    assert sm.predict(PLAIN, 3, ratio=0.1)["bottleneck"] == "sampling"
    assert sm.runners_to_saturate_learner(PLAIN, 0.1) == 5


def test_driver_costs_lower_the_learner_capacity():
    # c = 1 ms per env step; a sync of 8 ms + 1 ms per runner per chunk of 400 env steps
    inp = sm.Inputs(100.0, 50.0, 1e-3, sync_s_fixed=8e-3, sync_s_per_runner=1e-3)
    n = 4
    driver_s = 0.2 / 50.0 + 1e-3 + (8e-3 + n * 1e-3) / 400
    p = sm.predict(inp, n, ratio=0.2)
    assert p["bounds"]["learner"] == pytest.approx(1.0 / driver_s)
    assert p["env_steps_per_s"] == pytest.approx(1.0 / driver_s)
    assert p["learner_share_of_driver_time"] == pytest.approx(0.2 / 50.0 / driver_s)
    # more runners, more sync: the learner's capacity falls with N
    assert sm.predict(inp, 64, ratio=0.2)["bounds"]["learner"] < p["bounds"]["learner"]


def test_lockstep_adds_the_two_times():
    p = sm.predict(PLAIN, 1, ratio=0.2, async_sampling=False)
    assert p["env_steps_per_s"] == pytest.approx(1.0 / (1 / 100.0 + 1 / 250.0))
    assert p["bottleneck"].startswith("lockstep")


def test_contention_when_runners_exceed_free_cores():
    # CPU per env step: 1/100 in a runner + 0.2/50 in the learner = 0.014 s
    free = sm.predict(PLAIN, 2, ratio=0.2, cores=4)
    assert free["bottleneck"] == "sampling"
    assert free["env_steps_per_s"] == pytest.approx(200.0)
    # 2 cores, 1 kept busy elsewhere: the run wants 200 * 0.014 = 2.8 cores and gets its
    # fair share 2 * 2.8 / 3.8 of them
    p = sm.predict(PLAIN, 2, ratio=0.2, cores=2, busy_cores=1.0)
    got = 2 * 2.8 / 3.8
    assert p["cores_for_the_run"] == pytest.approx(got)
    assert p["env_steps_per_s"] == pytest.approx(got / 0.014)
    assert p["bottleneck"] == "cores"
    # sampling only (ratio 0) on 2 idle cores: 2 runners fit, 3 do not
    assert sm.predict(PLAIN, 2, ratio=0.0, cores=2)["bottleneck"] == "sampling"
    p3 = sm.predict(PLAIN, 3, ratio=0.0, cores=2)
    assert p3["bottleneck"] == "cores"
    assert p3["env_steps_per_s"] == pytest.approx(200.0)


def test_gpu_learner_moves_the_switch():
    gpu = sm.gpu_inputs(PLAIN, 200.0)
    assert gpu.learner_updates_per_s == 200.0
    assert gpu.learner_extra_s_per_update == pytest.approx(sm.GPU_H2D_S_PER_UPDATE)
    update_s = 1 / 200.0 + sm.GPU_H2D_S_PER_UPDATE
    assert sm.predict(gpu, 128, 0.2)["env_steps_per_s"] == pytest.approx(1 / (0.2 * update_s))
    assert sm.runners_to_saturate_learner(gpu, 0.2) > sm.runners_to_saturate_learner(PLAIN, 0.2)


def test_write_block_replaces_only_the_marked_block(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("# Perf\n\nkept\n")
    sm.write_block(doc, f"{sm.BEGIN}\nfirst\n{sm.END}")
    assert doc.read_text() == f"# Perf\n\nkept\n\n{sm.SECTION}\n\n{sm.BEGIN}\nfirst\n{sm.END}\n"
    doc.write_text(doc.read_text() + "\n## Later\n")
    sm.write_block(doc, f"{sm.BEGIN}\nsecond\n{sm.END}")
    text = doc.read_text()
    assert "first" not in text and "second" in text and text.endswith("\n## Later\n")
    assert text.count(sm.SECTION) == 1


def test_markdown_names_a_bottleneck_per_row():
    text = sm.markdown(None, PLAIN, 200.0, 0.2, "cmd")
    rows = [line for line in text.splitlines() if line.startswith("| CPU") or "| GPU" in line]
    assert len(rows) == 6
    assert all("learner |" in row or "sampling |" in row for row in rows)
