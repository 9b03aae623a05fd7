"""Our CVPO against FSRL's (the reference implementation), measured in the same run.

The machine's speed drifts by up to 2x over hours, so a ratio is only meaningful
between numbers measured back to back. This script runs, in one process tree:

1. **Learner**: FSRL's isolated CVPO update benchmark
   (``../shared/bench/fsrl/update_bench.py``) and ours (``benchmarks/learner.py``,
   the real RLlib learner), alternately (A B A B ...), at 1 and 2 torch threads.
   Both: batch 256, K=16, 128x128 networks, one reward and one cost critic,
   SafetyPointGoal1 dimensions (obs 60, act 2).
2. **End to end**: FSRL's training benchmark
   (``../shared/bench/fsrl/train_cvpo_bench.py``) and ours
   (``benchmarks/throughput.py``'s ``run``: one CVPO run with remote EnvRunners)
   on SafetyPointGoal1 at update ratio 0.2 with the same number of envs per side
   (FSRL: ``--training_num`` env subprocesses; ours: one EnvRunner holding that
   many vectorized envs). Alternated too when ``--e2e-repeats`` > 1.

FSRL runs in its own venv (it needs numpy<2 and gymnasium 0.28), built by FSRL's
``install.sh`` into ``.bench/fsrl-venv`` (git-ignored) when missing. FSRL's code is
run from ``../shared/bench/fsrl``, never copied here.

Prints progress lines and, as its last line, one JSON document with both sides'
numbers, the medians of the alternating runs and the ratios (ours / FSRL).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_FSRL_DIR = REPO.parent / "shared" / "bench" / "fsrl"
DEFAULT_VENV = REPO / ".bench" / "fsrl-venv"
OUR_ENV = "SafetyPointGoal1-v0"
FSRL_ENV = "SafetyPointGoal1Gymnasium-v0"  # FSRL's id of the same task
UPDATE_RATIO = 0.2


def log(msg: str) -> None:
    print(f"[vs_fsrl {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- environment ---------------------------------------------------------------------------
def ensure_fsrl_venv(venv: Path, fsrl_dir: Path) -> Path:
    """FSRL's python, building its venv with FSRL's install script when missing."""
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import fsrl, safety_gymnasium, tianshou"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    log(f"building FSRL's venv in {venv} (about 1-2 minutes)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["bash", str(fsrl_dir / "install.sh"), str(venv)], check=True)
    return py


def _busy_cores(seconds: float = 3.0) -> float | None:
    """Cores busy on the whole machine over ``seconds`` (from /proc/stat)."""

    def snap():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except OSError:
        return None
    total = t1 - t0
    return round((os.cpu_count() or 1) * (total - (i1 - i0)) / total, 2) if total else None


def machine_load() -> dict:
    """What else runs on the machine: load average and cores busy right now."""
    out = {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()], "busy_cores": _busy_cores()}
    try:
        ps = subprocess.run(
            ["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()[1:6]
        out["top_processes"] = [" ".join(line.split()[:4])[:100] for line in ps]
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# -- one measurement per side --------------------------------------------------------------
def _run(cmd: list[str], cwd: Path, timeout: float) -> tuple[list[dict], str, float]:
    """Runs ``cmd``; returns the JSON objects among its stdout lines, the output, wall s."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env_without_venv()
    )
    wall = time.perf_counter() - t0
    docs = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if proc.returncode != 0 or not docs:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (rc {proc.returncode}):\n{tail}")
    return docs, proc.stdout, wall


def _env_without_venv() -> dict:
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    return env


def fsrl_learner(py: Path, fsrl_dir: Path, threads: int, a, workdir: Path) -> dict:
    cmd = [
        str(py),
        str(fsrl_dir / "update_bench.py"),
        "--task",
        FSRL_ENV,
        "--unbounded",
        "--threads",
        str(threads),
        "--n",
        str(a.fsrl_updates),
        "--warmup",
        str(a.fsrl_warmup),
        "--fill",
        str(a.fsrl_fill),
    ]
    docs, _, wall = _run(cmd, workdir, a.learner_timeout)
    base = next(d for d in docs if d.get("logger", "").startswith("BaseLogger"))
    noop = next((d for d in docs if d.get("logger", "").startswith("DummyLogger")), None)
    return {
        "updates_per_s": base["updates_per_s"],
        "updates_per_s_noop_logger": None if noop is None else noop["updates_per_s"],
        "torch_threads": base["threads"],
        "n_updates": base["n_updates"],
        "ms_per_update": base["ms_per_update"],
        "ms_breakdown": {
            k: v for k, v in base.items() if k.startswith("ms_") and k != "ms_per_update"
        },
        "wall_s": round(wall, 1),
    }


def _sizes(a, threads: int) -> argparse.Namespace:
    """The run sizes for ``threads``: with several threads, ``--multi-thread-updates``
    (on an overloaded 2-core machine a 2-thread update can take a second, see notes)."""
    if threads == 1 or not a.multi_thread_updates:
        return a
    n = a.multi_thread_updates
    return argparse.Namespace(
        **{
            **vars(a),
            "fsrl_updates": n,
            "fsrl_warmup": min(a.fsrl_warmup, 10),
            "our_calls": -(-n // 8),
        }
    )


def ours_learner(threads: int, a) -> dict:
    cmd = [
        sys.executable,
        str(HERE / "learner.py"),
        "--threads",
        str(threads),
        "--reward-critics",
        "1",
        "--calls",
        str(a.our_calls),
    ]
    docs, _, wall = _run(cmd, REPO, a.learner_timeout)
    d = docs[-1]
    keep = (
        "updates_per_s",
        "torch_threads",
        "ms_per_update",
        "updates_per_learner_call",
        "reference_style_updates_per_s",
        "matmul_gflops_4096x128x128",
        "estep_critic_eval_ms",
        "estep_dual_solve_ms",
        "time_shares_profiled",
    )
    out = {k: d[k] for k in keep if k in d}
    out["n_updates"] = a.our_calls * d.get("updates_per_learner_call", 8)
    out["wall_s"] = round(wall, 1)
    return out


def fsrl_e2e(py: Path, fsrl_dir: Path, a, workdir: Path) -> dict:
    """FSRL's training benchmark; stopped once its timing JSON is written (the script
    then runs 20 evaluation episodes that are no part of the measurement)."""
    logdir = workdir / "fsrl_logs"
    name = f"bench_{time.time_ns()}"
    cmd = [
        str(py),
        str(fsrl_dir / "train_cvpo_bench.py"),
        "--task",
        FSRL_ENV,
        "--epoch",
        str(a.fsrl_epochs),
        "--step_per_epoch",
        str(a.fsrl_step_per_epoch),
        "--training_num",
        str(a.envs),
        "--episode_per_collect",
        str(a.envs),
        "--update_per_step",
        str(UPDATE_RATIO),
        "--thread",
        str(a.fsrl_e2e_thread),
        "--gamma",
        "0.99",
        "--n_step",
        "3",
        "--unbounded",
        "--cost_limit",
        "25",
        "--logdir",
        str(logdir),
        "--name",
        name,
    ]
    result = logdir / (name + "_bench.json")
    t0 = time.perf_counter()
    with open(workdir / f"{name}.log", "w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=_env_without_venv(),
        )
        res = None
        try:
            while time.perf_counter() - t0 < a.timeout:
                if result.exists():
                    try:
                        res = json.loads(result.read_text())
                        break
                    except json.JSONDecodeError:
                        pass  # being written
                if proc.poll() is not None:
                    if result.exists():
                        continue
                    break
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the group this call started
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    if res is None:
        tail = (workdir / f"{name}.log").read_text()[-3000:]
        raise RuntimeError(
            f"FSRL training benchmark wrote no result (rc {proc.returncode}):\n{tail}"
        )
    steps = res["train_env_steps"]
    train_s = res["t_collect_train_s"] + res["t_update_total_s"]
    return {
        "env_steps_per_s": round(res["env_steps_per_s_end_to_end"], 1),
        "env_steps_per_s_collect_and_update_only": round(steps / train_s, 1),
        "updates_per_s": round(res["gradient_updates"] / res["wall_learn_s"], 1),
        "train_env_steps": steps,
        "gradient_updates": res["gradient_updates"],
        "wall_learn_s": round(res["wall_learn_s"], 1),
        "t_collect_train_s": round(res["t_collect_train_s"], 1),
        "t_collect_test_s": round(res["t_collect_test_s"], 1),
        "t_update_s": round(res["t_update_total_s"], 1),
        "envs": a.envs,
        "torch_threads": a.fsrl_e2e_thread,
    }


def ours_e2e(a) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--ours-e2e-worker",
        "--envs",
        str(a.envs),
        "--our-seconds",
        str(a.our_seconds),
    ]
    docs, _, wall = _run(cmd, REPO, a.timeout)
    out = dict(docs[-1])
    out["wall_s"] = round(wall, 1)
    return out


def _ours_e2e_worker(a) -> None:
    """One end-to-end run of ours (in its own process, like FSRL's side)."""
    import numpy as np
    import ray

    sys.path.insert(0, str(HERE))
    from throughput import run

    np.seterr(all="ignore")
    ns = argparse.Namespace(
        envs_per_runner=a.envs, fragment=100, updates_per_call=8, reward_critics=1, sync=False
    )
    cores = os.cpu_count() or 1
    ray.init(num_cpus=max(cores, 2), include_dashboard=False, log_to_driver=False)
    try:
        res = run(OUR_ENV, 1, a.our_seconds, UPDATE_RATIO, True, ns)
    finally:
        ray.shutdown()
    res.update(envs=a.envs, env_runners=1, learner_torch_threads="auto (cores left by runners)")
    print(json.dumps(res), flush=True)


# -- summary -------------------------------------------------------------------------------
def _median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 1) if xs else None


def _safe(fn, *args) -> dict:
    """One benchmark process; a failure or timeout is recorded, not fatal."""
    try:
        return fn(*args)
    except (RuntimeError, subprocess.SubprocessError, OSError, StopIteration, KeyError) as e:
        log(f"{fn.__name__} failed: {str(e)[-300:]}")
        return {"error": f"{type(e).__name__}: {str(e)[-1000:]}"}


def _summary(fsrl_runs: list[dict], our_runs: list[dict], key: str, our_key=None) -> dict:
    f = [r.get(key) for r in fsrl_runs]
    o = [r.get(our_key or key) for r in our_runs]
    pairs = [round(b / a, 3) for a, b in zip(f, o, strict=False) if a and b]
    fm, om = _median(f), _median(o)
    return {
        "fsrl": f,
        "ours": o,
        "fsrl_median": fm,
        "ours_median": om,
        "ratio_of_medians": round(om / fm, 3) if fm else None,
        "pair_ratios": pairs,
        "median_pair_ratio": round(statistics.median(pairs), 3) if pairs else None,
    }


# -- the README's speed table, from saved runs ----------------------------------------------
README_BEGIN = "<!-- speed:start (written by benchmarks/vs_fsrl.py --write-readme; do not edit) -->"
README_END = "<!-- speed:end -->"


def _fmt(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def speed_table(docs: list[tuple[str, dict]]) -> str:
    """A markdown table of the ratios (ours / FSRL) in saved ``vs_fsrl`` JSON documents.

    One row per run; every number comes from the document (nothing is typed in).
    """
    rows = [
        "| run (JSON document) | date | learner, 1 thread | learner, 2 threads | end to end "
        "(FSRL's measure) | end to end (FSRL's collect + update only) | load avg at start |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d in docs:
        if d.get("benchmark") != "vs_fsrl":
            raise ValueError(f"{name} is not a vs_fsrl document (no 'benchmark': 'vs_fsrl')")
        r = d.get("ratios_ours_over_fsrl", {})
        load = d.get("machine_load_before") or {}
        avg = load.get("loadavg_1_5_15") if isinstance(load, dict) else None
        la = avg[0] if avg else None
        rows.append(
            f"| `{name}` | {str(d.get('date', ''))[:10]} | {_fmt(r.get('learner_1_thread'))}x "
            f"| {_fmt(r.get('learner_2_threads'))}x | {_fmt(r.get('end_to_end_env_steps_per_s'))}x "
            f"| {_fmt(r.get('end_to_end_vs_fsrl_collect_and_update_only'))}x | {_fmt(la, 1)} |"
        )
    return "\n".join(rows)


def write_readme_block(readme: Path, table: str) -> None:
    """Replace the text between the speed markers in ``readme`` by ``table``."""
    text = readme.read_text()
    i, j = text.find(README_BEGIN), text.find(README_END)
    if i < 0 or j < i:
        raise SystemExit(
            f"{readme} has no speed block: add the two lines\n{README_BEGIN}\n{README_END}\n"
            "where the table belongs"
        )
    readme.write_text(text[: i + len(README_BEGIN)] + "\n" + table + "\n" + text[j:])


def table_main(paths: list[Path], readme: Path | None) -> None:
    docs = []
    for path in paths:
        try:
            docs.append((str(path), json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"cannot read {path} as a vs_fsrl JSON document: {e}") from e
    try:
        table = speed_table(docs)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    if readme is not None:
        write_readme_block(readme, table)
        log(f"wrote the speed table ({len(docs)} runs) into {readme}")
    print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: one pair each, short runs")
    p.add_argument("--repeats", type=int, default=3, help="A B pairs per thread count")
    p.add_argument("--threads", default="1,2", help="torch threads of the learner runs")
    p.add_argument(
        "--threads-repeats",
        default=None,
        help="pairs per thread count, e.g. '1:3,2:1' (default: --repeats for each)",
    )
    p.add_argument(
        "--multi-thread-updates",
        type=int,
        default=None,
        help="updates per learner run with more than 1 thread (default: as with 1)",
    )
    p.add_argument("--e2e-repeats", type=int, default=1, help="end-to-end A B pairs")
    p.add_argument("--envs", type=int, default=2, help="training envs per side, end to end")
    p.add_argument("--fsrl-updates", type=int, default=300)
    p.add_argument("--fsrl-warmup", type=int, default=50)
    p.add_argument("--fsrl-fill", type=int, default=2000, help="env steps in FSRL's buffer")
    p.add_argument("--our-calls", type=int, default=40, help="learner calls of 8 updates")
    p.add_argument("--fsrl-epochs", type=int, default=2)
    p.add_argument("--fsrl-step-per-epoch", type=int, default=4000)
    p.add_argument(
        "--fsrl-e2e-thread",
        type=int,
        default=1,
        help="FSRL's torch threads in training (1: as our learner's on 2 cores with 1 runner; "
        "FSRL's script default is 2)",
    )
    p.add_argument("--our-seconds", type=float, default=60.0, help="our timed window, e2e")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--fsrl-dir", type=Path, default=DEFAULT_FSRL_DIR)
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument(
        "--learner-timeout",
        type=float,
        default=300.0,
        help="seconds per learner benchmark process (past it the run is recorded as failed: "
        "with 2 threads on an overloaded machine both sides fall to ~1 update/s)",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per end-to-end run")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON document here")
    p.add_argument("--ours-e2e-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--table",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="no run: print the ratio table of saved documents (written with --out)",
    )
    p.add_argument(
        "--write-readme",
        type=Path,
        default=None,
        metavar="README",
        help="with --table: also write it between the speed markers of this file",
    )
    a = p.parse_args()
    if a.table:
        table_main(a.table, a.write_readme)
        return
    if a.write_readme:
        p.error("--write-readme needs --table JSON ...")
    if a.ours_e2e_worker:
        _ours_e2e_worker(a)
        return
    if a.quick:
        a.repeats, a.e2e_repeats = 1, 1
        a.fsrl_updates, a.fsrl_warmup, a.our_calls = 100, 10, 12
        a.fsrl_epochs, a.fsrl_step_per_epoch, a.our_seconds = 1, 2000, 15.0
        a.multi_thread_updates = a.multi_thread_updates or 24
    a.fsrl_dir = a.fsrl_dir.resolve()
    if not (a.fsrl_dir / "update_bench.py").exists():
        p.error(f"no FSRL benchmarks in {a.fsrl_dir} (--fsrl-dir)")
    threads = [int(t) for t in a.threads.split(",")]
    t_start = time.perf_counter()
    py = ensure_fsrl_venv(a.venv, a.fsrl_dir)
    load_before = machine_load()
    log(f"machine load before: {load_before}")
    learner: dict = {}
    with tempfile.TemporaryDirectory(prefix="vs_fsrl_") as tmp:
        work = Path(tmp)
        reps = dict(x.split(":") for x in a.threads_repeats.split(",")) if a.threads_repeats else {}
        for th in threads:
            fr, orr = [], []
            sizes = _sizes(a, th)
            for i in range(int(reps.get(str(th), a.repeats))):
                fr.append(_safe(fsrl_learner, py, a.fsrl_dir, th, sizes, work))
                log(f"learner {th} thread(s), pair {i + 1}: FSRL {fr[-1].get('updates_per_s')} u/s")
                orr.append(_safe(ours_learner, th, sizes))
                log(
                    f"learner {th} thread(s), pair {i + 1}: ours {orr[-1].get('updates_per_s')} u/s"
                )
            noop = [r.get("updates_per_s_noop_logger") for r in fr]
            learner[f"{th}_thread" + ("s" if th > 1 else "")] = {
                "updates_per_s": _summary(fr, orr, "updates_per_s"),
                "fsrl_noop_logger_updates_per_s": noop,
                "ratio_of_medians_vs_fsrl_noop_logger": round(
                    _median([r.get("updates_per_s") for r in orr]) / _median(noop), 3
                )
                if _median(noop) and _median([r.get("updates_per_s") for r in orr])
                else None,
                "fsrl_runs": fr,
                "our_runs": orr,
            }
        e2e = None
        if not a.skip_e2e:
            fr, orr = [], []
            for i in range(a.e2e_repeats):
                fr.append(_safe(fsrl_e2e, py, a.fsrl_dir, a, work))
                log(f"end to end, pair {i + 1}: FSRL {fr[-1].get('env_steps_per_s')} env steps/s")
                orr.append(_safe(ours_e2e, a))
                log(f"end to end, pair {i + 1}: ours {orr[-1].get('env_steps_per_s')} env steps/s")
            e2e = {
                "task": OUR_ENV,
                "update_ratio": UPDATE_RATIO,
                "envs_per_side": a.envs,
                "env_steps_per_s": _summary(fr, orr, "env_steps_per_s"),
                "env_steps_per_s_vs_fsrl_collect_and_update_only": _summary(
                    fr, orr, "env_steps_per_s_collect_and_update_only", "env_steps_per_s"
                ),
                "fsrl_runs": fr,
                "our_runs": orr,
            }
    load_after = machine_load()

    def ratio(block, key):
        return None if block is None else block[key]["median_pair_ratio"]

    out = {
        "benchmark": "vs_fsrl",
        "mode": "quick" if a.quick else "full",
        "command": "python benchmarks/vs_fsrl.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_count": os.cpu_count(),
        "hyper_parameters": {
            "batch": 256,
            "K": 16,
            "hidden": [128, 128],
            "reward_critics": 1,
            "cost_critics": 1,
            "obs_dim": 60,
            "act_dim": 2,
            "update_ratio_end_to_end": UPDATE_RATIO,
        },
        "ratios_ours_over_fsrl": {
            **{f"learner_{k}": ratio(v, "updates_per_s") for k, v in learner.items()},
            "end_to_end_env_steps_per_s": ratio(e2e, "env_steps_per_s"),
            "end_to_end_vs_fsrl_collect_and_update_only": ratio(
                e2e, "env_steps_per_s_vs_fsrl_collect_and_update_only"
            ),
        },
        "learner": learner,
        "end_to_end": e2e,
        "machine_load_before": load_before,
        "machine_load_after": load_after,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "notes": [
            "ratios are medians of the per-pair ratios (A B pairs, run back to back)",
            "FSRL learner: update_bench.py with BaseLogger (as in training); the no-op "
            "logger numbers are listed too. Its agent is built with gamma 0.97, n_step 2.",
            "ours learner: benchmarks/learner.py (RLlib Learner.update, 8 updates per call, "
            "random SafetyPointGoal1-shaped batches)",
            "end to end: FSRL env_steps_per_s is train env steps / wall of agent.learn "
            "(FSRL's own measure: includes its set-up and 2 test episodes per epoch); "
            "FSRL collect_and_update_only is train env steps / (train collection + update "
            "time), its steady state and the stricter reference; ours is env steps / timed "
            "window after a 2000-step warm-up (benchmarks/throughput.py run, 1 EnvRunner "
            "with all the envs, async sampling, no evaluation)",
            "machine_load_*: the load when the run started and ended; every number here was "
            "measured while other processes shared the cores",
            "with 2 torch threads on 2 cores that other processes keep busy, every OpenMP "
            "barrier waits for both threads to be scheduled: both sides fall to about 1 "
            "update/s, so the 2-thread numbers measure the scheduler more than the code",
        ],
    }
    text = json.dumps(out)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
