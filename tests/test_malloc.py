"""cvpo._malloc: glibc thresholds that keep the learner's large tensors on warm pages."""

import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import resource, torch
    from cvpo._malloc import tune_malloc
    from cvpo.networks import CriticEnsemble
    applied = tune_malloc()
    assert tune_malloc() is applied  # idempotent
    torch.set_num_threads(1)
    torch.manual_seed(0)
    critics = CriticEnsemble(60, 2, num_members=3)  # the E-step pass at B=256, K=16
    obs, act = torch.randn(256, 60), torch.randn(256, 16, 2)
    with torch.no_grad():
        for _ in range(3):
            critics(obs, act)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            critics(obs, act)
    print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
    """
)


def _probe(env_value):
    env = dict(os.environ)
    env.pop("CVPO_MALLOC_TUNING", None)
    if env_value is not None:
        env["CVPO_MALLOC_TUNING"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", float(out[1])


def test_tuning_removes_page_faults_of_the_estep_critic_pass():
    applied, faults = _probe(None)
    off, faults_off = _probe("0")
    assert applied and not off
    # Without the tuning every (3, 4096, 128) activation is a fresh mmap whose
    # pages fault in again on each pass (~3000 faults per pass measured); with it
    # the freed blocks stay mapped in the heap.
    assert faults_off > 500, faults_off
    assert faults < faults_off / 10, (faults, faults_off)
