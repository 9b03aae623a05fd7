"""Scaling model: env steps/s and updates/s for N EnvRunners and a CPU or GPU learner.

CVPO's training loop (``rllib_ext/common/off_policy.py``) runs the learner in the
driver and holds the update ratio exactly: after each sampled chunk it performs
the updates owed (``training_intensity`` per env step), so

    updates/s = ratio * env steps/s.

Three capacities bound env steps/s (the smallest one is the bottleneck):

- **sampling**: ``N * r`` with ``r`` the env steps/s of one EnvRunner on a core of
  its own (measured with sampling only);
- **learner**: the driver's serial time per env step is
  ``ratio / u + c + (w0 + N * w1) / chunk``: the updates owed (``u``
  updates/s), the ingest of the sampled data (``c`` s per env step: fetching the
  chunks through Ray, converting them, adding them to the replay), and the
  weight sync after each training iteration's updates (``w0`` fixed, ``w1`` per
  runner: one fire-and-forget remote call each), counted once per sampled chunk
  of ``chunk`` env steps (fragment x envs per runner; an iteration takes at least
  one chunk, so this is an upper bound). Its inverse is the learner's capacity
  in env steps/s;
- **cores**: the CPU time per env step (``1/r`` in a runner, plus the driver's
  time above with the update counted ``learner_cores`` times) against the cores
  this run gets. When other processes keep ``b`` cores busy and the run would
  want ``D`` cores, it gets ``cores - b`` if ``D + b <= cores``, else the fair
  share ``cores * D / (D + b)``. This is the contention when N > free cores.

With asynchronous sampling (the default with remote runners) sampling and
learning overlap, so env steps/s = min(sampling, learner, cores); in lockstep the
two times add: 1 / (1/sampling + 1/learner), capped by cores.

``--measure`` measures the inputs on this machine (``r``, ``c``, ``w0``, ``w1``
from short CVPO runs on SafetyPointGoal1 with ``benchmarks/throughput.py``'s
configuration; ``u`` from ``benchmarks/learner.py --threads 1``), then compares
the model with end-to-end and sampling-only runs at N = 1, 2. ``--write FILE``
replaces the block between the scaling-model markers in FILE (docs/performance.md)
with the inputs, that check and a table for N = 8, 32, 128 with a CPU learner
(measured ``u``) and a GPU learner (assumed ``u``, see ``--gpu-updates-per-s``).
Without ``--measure``, the inputs come from ``--inputs FILE`` (a previous run's
JSON) or the flags. Prints one JSON document as its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN = "<!-- scaling-model:begin (written by benchmarks/scaling_model.py --write) -->"
END = "<!-- scaling-model:end -->"
SECTION = "## Scaling model"

# The GPU learner is an assumption (no GPU was lent to the task that wrote this):
# one update of batch 256, K=16, 128x128 issues a few hundred small kernels (critic
# passes over B*K = 4096 pairs, backward, fused Adam, polyak) at ~5-10 us of launch
# and Python each, plus one device->host copy of the (K, B) Q values for the numpy
# dual solve. About 5 ms per update, i.e. 200 updates/s, launch- and Python-bound.
GPU_UPDATES_PER_S = 200.0
# Host->device copy of one update's batch: 256 transitions of
# (2 * 60 obs + 2 act + reward, cost, discount) float32 = 128 KB at ~10 GB/s, plus
# ~20 us of call overhead.
GPU_H2D_S_PER_UPDATE = 256 * (2 * 60 + 2 + 3) * 4 / 10e9 + 20e-6


@dataclass
class Inputs:
    """What the model needs; rates in env steps/s or updates/s, costs in seconds."""

    runner_env_steps_per_s: float  # r: one EnvRunner, sampling only, a core of its own
    learner_updates_per_s: float  # u: the learner's update rate
    ingest_s_per_env_step: float  # c: driver time per sampled env step
    sync_s_fixed: float = 0.0  # w0: one weight sync, fixed part
    sync_s_per_runner: float = 0.0  # w1: one weight sync, per runner
    chunk_env_steps: int = 400  # env steps per sampled chunk (100 x 4 envs): at most one sync
    learner_cores: float = 1.0  # cores the learner keeps busy while it updates
    learner_extra_s_per_update: float = 0.0  # e.g. the GPU's host->device batch copy


def predict(
    inp: Inputs,
    n_runners: int,
    ratio: float = 0.2,
    cores: float | None = None,
    busy_cores: float = 0.0,
    async_sampling: bool = True,
) -> dict:
    """Env steps/s, updates/s and the bottleneck for ``n_runners`` EnvRunners.

    ``ratio`` is ``training_intensity`` (updates per env step; 0 for sampling
    only). ``cores`` is the machine's (None: unlimited, one core per runner and
    for the learner); ``busy_cores`` what other processes keep busy.
    """
    r, u = inp.runner_env_steps_per_s, inp.learner_updates_per_s
    sampling = n_runners * r
    sync = inp.sync_s_fixed + n_runners * inp.sync_s_per_runner
    update_s = 1.0 / u + inp.learner_extra_s_per_update
    sync_per_step = sync / inp.chunk_env_steps if ratio > 0 else 0.0
    driver_s = ratio * update_s + inp.ingest_s_per_env_step + sync_per_step
    learner = 1.0 / driver_s if driver_s > 0 else float("inf")
    if async_sampling:
        unconstrained = min(sampling, learner)
    else:
        unconstrained = 1.0 / (1.0 / sampling + 1.0 / learner)
    cpu_s = (
        1.0 / r + ratio * update_s * inp.learner_cores + inp.ingest_s_per_env_step + sync_per_step
    )
    if cores is None:
        cores_bound, got = float("inf"), None
    else:
        want = unconstrained * cpu_s
        got = (
            cores - busy_cores if want + busy_cores <= cores else cores * want / (want + busy_cores)
        )
        cores_bound = got / cpu_s
    bounds = {"sampling": sampling, "learner": learner, "cores": cores_bound}
    steps = min(unconstrained, cores_bound)
    if cores_bound < unconstrained:
        bottleneck = "cores"
    elif not async_sampling:
        bottleneck = "lockstep (sampling + learner)"
    else:
        bottleneck = "sampling" if sampling <= learner else "learner"
    return {
        "runners": n_runners,
        "env_steps_per_s": steps,
        "updates_per_s": ratio * steps,
        "bottleneck": bottleneck,
        "bounds": bounds,
        "cores_for_the_run": got,
        "learner_share_of_driver_time": ratio * update_s / driver_s if driver_s > 0 else 0.0,
    }


def runners_to_saturate_learner(inp: Inputs, ratio: float = 0.2) -> int:
    """The smallest N whose sampling capacity reaches the learner's (no core limit)."""
    n = 1
    while n < 1_000_000:
        p = predict(inp, n, ratio)
        if p["bounds"]["sampling"] >= p["bounds"]["learner"]:
            return n
        n += 1
    return n


def gpu_inputs(cpu: Inputs, gpu_updates_per_s: float) -> Inputs:
    """The CPU learner's measured inputs with an assumed GPU learner."""
    d = asdict(cpu)
    d.update(
        learner_updates_per_s=gpu_updates_per_s,
        learner_extra_s_per_update=GPU_H2D_S_PER_UPDATE,
        learner_cores=1.0,  # the driver's Python, launching kernels
    )
    return Inputs(**d)


# -- measurement on this machine -------------------------------------------------------------
def _busy_cores(seconds: float = 3.0) -> float:
    def snap():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]

    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def _learner_rate(calls: int) -> dict:
    cmd = [sys.executable, str(HERE / "learner.py"), "--threads", "1", "--calls", str(calls)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


class _Probe:
    """Times the driver inside ``benchmarks/throughput.py``'s ``run`` (class-level
    wrappers, in this process only): per ``train()`` call the wall time, the
    driver's CPU time, env steps and updates; the weight syncs' wall time."""

    def __init__(self):
        from ray.rllib.algorithms.algorithm import Algorithm
        from ray.rllib.env.env_runner_group import EnvRunnerGroup

        from rllib_ext.common import metrics as M

        self.train_log: list[tuple[float, float, int, int]] = []
        self.sync_log: list[tuple[float, float]] = []
        orig_train, orig_sync = Algorithm.train, EnvRunnerGroup.sync_weights
        probe = self

        def train(algo, *a, **k):
            res = orig_train(algo, *a, **k)
            probe.train_log.append(
                (
                    time.perf_counter(),
                    time.process_time(),
                    res["env_runners"]["num_env_steps_sampled_lifetime"],
                    res.get(M.CVPO_RESULTS, {}).get(M.UPDATES_LIFETIME, 0),
                )
            )
            return res

        def sync_weights(group, *a, **k):
            t0 = time.perf_counter()
            try:
                return orig_sync(group, *a, **k)
            finally:
                probe.sync_log.append((t0, time.perf_counter() - t0))

        Algorithm.train, EnvRunnerGroup.sync_weights = train, sync_weights

    def window(self, warmup_steps: int = 2000) -> dict:
        """The timed window of ``throughput.run``: from the first call past warm-up."""
        log = self.train_log
        i0 = next(i for i, e in enumerate(log) if e[2] >= warmup_steps)
        (t0, c0, s0, u0), (t1, c1, s1, u1) = log[i0], log[-1]
        syncs = [dt for t, dt in self.sync_log if t0 <= t <= t1]
        self.train_log, self.sync_log = [], []
        steps = max(s1 - s0, 1)
        return {
            "env_steps_per_s": steps / (t1 - t0),
            "updates_per_s": (u1 - u0) / (t1 - t0),
            "driver_cpu_s_per_env_step": (c1 - c0) / steps,
            "sync_s": sum(syncs) / len(syncs) if syncs else None,
            "syncs": len(syncs),
        }


def measure(seconds: float, learner_calls: int, ratio: float) -> dict:
    """Inputs from this machine, and end-to-end / sampling-only runs at N = 1, 2."""
    import numpy as np
    import ray

    sys.path.insert(0, str(HERE))
    from throughput import run

    np.seterr(all="ignore")
    cores = os.cpu_count() or 1
    busy_before = _busy_cores()
    learner = _learner_rate(learner_calls)
    ns = argparse.Namespace(
        envs_per_runner=4, fragment=100, updates_per_call=8, reward_critics=1, sync=False
    )
    probe = _Probe()
    ray.init(num_cpus=max(cores, 3), include_dashboard=False, log_to_driver=False)
    runs = {}
    try:
        for learn, n in ((False, 1), (False, 2), (True, 1), (True, 2)):
            run("SafetyPointGoal1-v0", n, seconds, ratio, learn, ns)
            w = probe.window()
            w.update(runners=n, learn=learn)
            runs[f"{'end_to_end' if learn else 'sampling_only'}_{n}"] = w
            print(json.dumps(w), flush=True)
    finally:
        ray.shutdown()
    busy_after = _busy_cores()
    s1, e1, e2 = runs["sampling_only_1"], runs["end_to_end_1"], runs["end_to_end_2"]
    w_1, w_2 = e1["sync_s"] or 0.0, e2["sync_s"] or 0.0
    w1 = max(w_2 - w_1, 0.0)
    inp = Inputs(
        runner_env_steps_per_s=s1["env_steps_per_s"],
        learner_updates_per_s=learner["updates_per_s"],
        ingest_s_per_env_step=s1["driver_cpu_s_per_env_step"],
        sync_s_fixed=max(w_1 - w1, 0.0),
        sync_s_per_runner=w1,
        chunk_env_steps=ns.fragment * ns.envs_per_runner,
        learner_cores=1.0,
    )
    return {
        "inputs": asdict(inp),
        "cpu_count": cores,
        "busy_cores_before": round(busy_before, 2),
        "busy_cores_after": round(busy_after, 2),
        "learner_benchmark": {
            k: learner.get(k) for k in ("updates_per_s", "ms_per_update", "torch_threads")
        },
        "runs": runs,
        "settings": "SafetyPointGoal1-v0, 4 envs per EnvRunner, fragment 100, batch 256, "
        f"K=16, 128x128, 1 reward + 1 cost critic, ratio {ratio}, async sampling",
    }


# -- report -------------------------------------------------------------------------------
def check_rows(m: dict, ratio: float) -> list[dict]:
    """Model against the measured runs at N = 1, 2 on this machine."""
    inp = Inputs(**m["inputs"])
    busy = (m["busy_cores_before"] + m["busy_cores_after"]) / 2
    rows = []
    for key, run in m["runs"].items():
        rr = ratio if run["learn"] else 0.0
        p = predict(inp, run["runners"], rr, cores=m["cpu_count"], busy_cores=busy)
        rows.append(
            {
                "run": key,
                "runners": run["runners"],
                "measured_env_steps_per_s": round(run["env_steps_per_s"], 1),
                "model_env_steps_per_s": round(p["env_steps_per_s"], 1),
                "model_over_measured": round(p["env_steps_per_s"] / run["env_steps_per_s"], 2),
                "measured_updates_per_s": round(run["updates_per_s"], 1),
                "model_updates_per_s": round(p["updates_per_s"], 1),
                "bottleneck": p["bottleneck"],
            }
        )
    return rows


def projection_rows(inp: Inputs, gpu_u: float, ratio: float, ns=(8, 32, 128)) -> list[dict]:
    rows = []
    for name, x in (("CPU (measured u)", inp), ("GPU (assumed u)", gpu_inputs(inp, gpu_u))):
        for n in ns:
            p = predict(x, n, ratio)
            b = p["bounds"]
            rows.append(
                {
                    "learner": name,
                    "runners": n,
                    "env_steps_per_s": round(p["env_steps_per_s"]),
                    "updates_per_s": round(p["updates_per_s"], 1),
                    "sampling_capacity": round(b["sampling"]),
                    "learner_capacity": round(b["learner"]),
                    "learner_share_of_driver_time": round(p["learner_share_of_driver_time"], 2),
                    "bottleneck": p["bottleneck"],
                    # data-parallel learners that would match the sampling capacity,
                    # if they scaled linearly (outside this model: it has one learner)
                    "learners_to_match_sampling": math.ceil(b["sampling"] / b["learner"]),
                }
            )
    return rows


def markdown(m: dict | None, inp: Inputs, gpu_u: float, ratio: float, cmd: str) -> str:
    gpu = gpu_inputs(inp, gpu_u)
    lines = [BEGIN, ""]
    lines.append(f"Written by `{cmd}` on {time.strftime('%Y-%m-%d %H:%M %Z')}.")
    lines.append("")
    lines.append(f"Inputs (update ratio {ratio}, chunks of {inp.chunk_env_steps} env steps):")
    lines.append("")
    how = " (measured)" if m is not None else " (given)"
    lines.append(
        f"- `r` = {inp.runner_env_steps_per_s:.0f} env steps/s per EnvRunner "
        f"(4 envs, sampling only){how}"
    )
    lines.append(
        f"- `u` = {inp.learner_updates_per_s:.1f} updates/s, CPU learner, 1 thread"
        + (" (`benchmarks/learner.py --threads 1`)" if m is not None else how)
    )
    lines.append(
        f"- `c` = {1e6 * inp.ingest_s_per_env_step:.0f} us of driver time per env step "
        "(fetching, converting and storing the sampled data)"
    )
    lines.append(
        f"- weight sync: `w0` = {1e3 * inp.sync_s_fixed:.2f} ms per sync, "
        f"`w1` = {1e3 * inp.sync_s_per_runner:.2f} ms per runner and sync "
        "(from the syncs' wall time at N = 1 and 2)"
    )
    lines.append(
        f"- GPU learner (**assumed, not measured**: no GPU in the task that wrote this): "
        f"`u` = {gpu_u:.0f} updates/s (about {1e3 / gpu_u:.0f} ms per update, bound by "
        f"kernel launches and Python), plus {1e6 * GPU_H2D_S_PER_UPDATE:.0f} us per "
        "update for the batch's host-to-device copy"
    )
    lines.append("")
    if m is not None:
        busy = (m["busy_cores_before"] + m["busy_cores_after"]) / 2
        lines.append(
            f"Check on this machine ({m['cpu_count']} cores; other processes kept "
            f"{m['busy_cores_before']:.1f} cores busy before and {m['busy_cores_after']:.1f} "
            f"after the measurement; the model uses {busy:.1f}):"
        )
        lines.append("")
        lines.append(
            "| run | N | measured env steps/s | model | model / measured | "
            "measured updates/s | model | bottleneck (model) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in check_rows(m, ratio):
            lines.append(
                f"| {r['run'].replace('_', ' ')} | {r['runners']} | "
                f"{r['measured_env_steps_per_s']} | {r['model_env_steps_per_s']} | "
                f"{r['model_over_measured']} | {r['measured_updates_per_s']} | "
                f"{r['model_updates_per_s']} | {r['bottleneck']} |"
            )
        lines.append("")
    lines.append(
        "Projection, one core per EnvRunner and one for the driver and learner, nothing else "
        "running, async sampling:"
    )
    lines.append("")
    lines.append(
        "| learner | N | env steps/s | updates/s | sampling capacity | learner capacity "
        "| driver time in updates | bottleneck | learners to match sampling* |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in projection_rows(inp, gpu_u, ratio):
        lines.append(
            f"| {r['learner']} | {r['runners']} | {r['env_steps_per_s']:,} | "
            f"{r['updates_per_s']:,} | {r['sampling_capacity']:,} | "
            f"{r['learner_capacity']:,} | {r['learner_share_of_driver_time']:.0%} | "
            f"{r['bottleneck']} | {r['learners_to_match_sampling']} |"
        )
    lines.append("")
    lines.append(
        "\\* data-parallel learners whose summed capacity would reach the sampling capacity, "
        "if they scaled linearly; the model itself has one learner in the driver."
    )
    lines.append("")
    lines.append(
        f"The learner binds from N = {runners_to_saturate_learner(inp, ratio)} with the CPU "
        f"learner and from N = {runners_to_saturate_learner(gpu, ratio)} with the GPU one."
    )
    lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_block(path: Path, block: str) -> None:
    """Replaces the marked block in ``path`` (appends a section with it if absent)."""
    text = path.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", action="store_true", help="measure the inputs on this machine")
    p.add_argument("--seconds", type=float, default=30.0, help="timed window per measured run")
    p.add_argument("--learner-calls", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="10 s windows")
    p.add_argument("--inputs", type=Path, help="a previous run's JSON (its 'measured' part)")
    p.add_argument("--runner-rate", type=float, help="r: env steps/s of one EnvRunner")
    p.add_argument("--updates-per-s", type=float, help="u: the CPU learner's updates/s")
    p.add_argument("--ingest-us", type=float, default=200.0, help="c in us per env step")
    p.add_argument("--ratio", type=float, default=0.2, help="training_intensity")
    p.add_argument("--gpu-updates-per-s", type=float, default=GPU_UPDATES_PER_S)
    p.add_argument("--runners", default="8,32,128")
    p.add_argument("--cores", type=float, default=None, help="for --runners: the machine's")
    p.add_argument("--write", type=Path, help="replace the scaling-model block in this file")
    p.add_argument("--out", type=Path, help="also write the JSON document here")
    a = p.parse_args()
    if a.quick:
        a.seconds, a.learner_calls = 10.0, 10
    m = None
    if a.measure:
        m = measure(a.seconds, a.learner_calls, a.ratio)
    elif a.inputs:
        doc = json.loads(a.inputs.read_text())
        m = doc.get("measured", doc)
    if m is not None:
        inp = Inputs(**m["inputs"])
    elif a.runner_rate and a.updates_per_s:
        inp = Inputs(a.runner_rate, a.updates_per_s, a.ingest_us * 1e-6)
    else:
        p.error("give --measure, --inputs FILE, or --runner-rate and --updates-per-s")
    ns = [int(x) for x in a.runners.split(",")]
    out = {
        "benchmark": "scaling_model",
        "ratio": a.ratio,
        "measured": m,
        "check": None if m is None else check_rows(m, a.ratio),
        "gpu_learner_updates_per_s_assumed": a.gpu_updates_per_s,
        "projection": projection_rows(inp, a.gpu_updates_per_s, a.ratio, ns),
        "runners_to_saturate_learner": {
            "cpu": runners_to_saturate_learner(inp, a.ratio),
            "gpu": runners_to_saturate_learner(gpu_inputs(inp, a.gpu_updates_per_s), a.ratio),
        },
    }
    if a.cores is not None:
        out["projection_on_cores"] = [
            {"runners": n, **predict(inp, n, a.ratio, cores=a.cores)} for n in ns
        ]
    if a.write:
        cmd = "python benchmarks/scaling_model.py " + " ".join(sys.argv[1:])
        write_block(a.write, markdown(m, inp, a.gpu_updates_per_s, a.ratio, cmd.strip()))
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
