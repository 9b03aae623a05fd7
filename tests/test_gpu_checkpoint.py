"""A checkpoint written by a GPU learner restores on a CPU-only machine.

No GPU is needed: a GPU run's learner state is simulated. torch pickles a
tensor's storage with its device; a CPU storage is pickled here with the tag
"cuda:0" (a tagger registered with torch.serialization for the duration of the
dump), so loading the bytes without CUDA fails exactly as a real GPU
checkpoint's does ("Attempting to deserialize object on a CUDA device").
"""

import contextlib
import copy
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from rllib_ext.common.torch_learner import load_pickled_tensors_on_cpu
from rllib_ext.cvpo import CVPO
from rllib_ext.cvpo.cvpo_learner import LEARNER_STATE_KEY

MID = DEFAULT_MODULE_ID
B = 64


@contextlib.contextmanager
def pickled_as_cuda():
    """While active, torch pickles CPU storages as if they lived on cuda:0."""
    from torch import serialization

    entry = (-10_000, lambda s: "cuda:0" if s.device.type == "cpu" else None, lambda s, loc: None)
    serialization._package_registry.append(entry)
    serialization._package_registry.sort(key=lambda e: e[0])
    try:
        yield
    finally:
        serialization._package_registry.remove(entry)


def _tensors(tree, path=""):
    if isinstance(tree, torch.Tensor):
        yield path
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{path}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{path}/{i}")


@pytest.fixture(scope="module")
def cpu_checkpoint(tmp_path_factory, tiny_config):
    """A CPU run's checkpoint after 2 iterations (updates done) and a fixed minibatch."""
    import ray
    from conftest import start_local_ray

    if not ray.is_initialized():
        start_local_ray()
    algo = tiny_config().build_algo()
    try:
        algo.train()
        algo.train()
        learner = algo.learner_group._learner
        state = learner.get_state()
        batch = algo._replay.sample(B)
        path = algo.save(str(tmp_path_factory.mktemp("cpu") / "ckpt")).checkpoint.path
    finally:
        algo.stop()
    return Path(path), state, batch


def test_learner_state_holds_no_torch_tensors(cpu_checkpoint):
    _, state, _ = cpu_checkpoint
    assert list(_tensors(state)) == []
    cvpo = state[LEARNER_STATE_KEY]
    assert cvpo["generator"].dtype == np.uint8 and cvpo["generator"].size > 16  # CPU mt19937
    assert not any(k.startswith("generator_") for k in cvpo)
    trust = cvpo[MID]["trust_region"]
    for k in ("alpha_mu", "alpha_sigma"):
        assert isinstance(trust[k], np.ndarray) and trust[k].dtype == np.float32, k
    assert cvpo[MID]["counters"]["updates"] > 0 and cvpo[MID]["dual"] is not None


def _next_update(path: Path, batch):
    """Restores ``path`` on the CPU, runs one update on ``batch``; the learner afterwards."""
    algo = CVPO.from_checkpoint(str(path))
    try:
        learner = algo.learner_group._learner
        generator = learner._generator.get_state().clone()
        learner_state = learner.get_cvpo_state()
        algo.learner_group.update(
            batch=MultiAgentBatch({MID: SampleBatch(dict(batch))}, env_steps=B),
            timesteps={"num_env_steps_sampled_lifetime": 10_000},
            minibatch_size=B,
            num_epochs=1,
        )
        weights = {k: v.detach().clone() for k, v in learner.module[MID].state_dict().items()}
        after = learner.get_cvpo_state()
        moments = {
            name: {
                i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(opt.state.values())
            }
            for name, opt in ((n, learner.get_optimizer(MID, n)) for n in ("critic", "actor"))
        }
    finally:
        algo.stop()
    return generator, learner_state, weights, after, moments


def _rewrite_learner_state(src: Path, dst: Path, edit, as_cuda=False) -> bytes:
    shutil.copytree(src, dst)
    state_file = dst / "learner_group" / "learner" / "state.pkl"
    with open(state_file, "rb") as f:
        state = pickle.load(f)
    state = edit(copy.deepcopy(state))
    with pickled_as_cuda() if as_cuda else contextlib.nullcontext():
        blob = pickle.dumps(state)
    state_file.write_bytes(blob)
    return blob


def test_gpu_written_checkpoint_restores_on_cpu_and_trains_identically(
    cpu_checkpoint, tmp_path, caplog
):
    src, _, batch = cpu_checkpoint
    assert not torch.cuda.is_available()

    def device_free_part(state):  # what a CPU learner can use of a GPU run's state
        del state[LEARNER_STATE_KEY]["generator"]
        return state

    def as_written_on_gpu(state):
        cvpo = state[LEARNER_STATE_KEY]
        del cvpo["generator"]
        # a CUDA generator's state: Philox seed and offset, 16 bytes
        cvpo["generator_cuda"] = np.arange(16, dtype=np.uint8)
        # the M-step multipliers as the tensors (on the GPU) that older versions stored
        trust = cvpo[MID]["trust_region"]
        for k in ("alpha_mu", "alpha_sigma"):
            trust[k] = torch.as_tensor(trust[k])
        eta, lambdas = cvpo[MID]["dual"]
        cvpo[MID]["dual"] = (eta, torch.as_tensor(lambdas))
        # optimizer moments as tensors too
        for entry in state["optimizer"].values():
            for moments in entry["state"]["state"].values():
                for k in list(moments):
                    moments[k] = torch.as_tensor(np.asarray(moments[k]))
        return state

    _rewrite_learner_state(src, tmp_path / "reference", device_free_part)
    blob = _rewrite_learner_state(src, tmp_path / "gpu", as_written_on_gpu, as_cuda=True)

    # the simulation is faithful: without the fix, these bytes do not load on a CPU machine
    with pytest.raises(RuntimeError, match="deserialize object on a CUDA device"):
        pickle.loads(blob)
    with load_pickled_tensors_on_cpu():  # the learner's loader: map_location="cpu"
        loaded = pickle.loads(blob)
    assert loaded[LEARNER_STATE_KEY][MID]["trust_region"]["alpha_mu"].device.type == "cpu"

    with caplog.at_level(logging.WARNING, logger="rllib_ext.common.torch_learner"):
        gpu = _next_update(tmp_path / "gpu", batch)
    ref = _next_update(tmp_path / "reference", batch)
    assert any("generator_cuda" in r.getMessage() for r in caplog.records)

    gen_gpu, before_gpu, w_gpu, after_gpu, m_gpu = gpu
    gen_ref, before_ref, w_ref, after_ref, m_ref = ref
    # restored: the generator reseeded deterministically (seed 0 + 7919 + updates done)
    updates = before_ref[MID]["counters"]["updates"]
    expected = torch.Generator().manual_seed(7919 + updates).get_state()
    assert torch.equal(gen_gpu, expected) and torch.equal(gen_ref, expected)
    for k in ("alpha_mu", "alpha_sigma"):
        assert before_gpu[MID]["trust_region"][k] == before_ref[MID]["trust_region"][k]
        assert before_gpu[MID]["trust_region"][k].dtype == np.float32
    # ... and the next update is bit-identical to the CPU-only restore
    assert set(w_gpu) == set(w_ref)
    for k in w_ref:
        assert torch.equal(w_gpu[k], w_ref[k]), k
    assert after_gpu[MID]["dual"][0] == after_ref[MID]["dual"][0]
    np.testing.assert_array_equal(after_gpu[MID]["dual"][1], after_ref[MID]["dual"][1])
    for k in ("alpha_mu", "alpha_sigma"):
        np.testing.assert_array_equal(
            after_gpu[MID]["trust_region"][k], after_ref[MID]["trust_region"][k]
        )
    assert (
        after_gpu[MID]["counters"]
        == after_ref[MID]["counters"]
        == {"updates": updates + 1, "skipped": 0}
    )
    np.testing.assert_array_equal(after_gpu["generator"], after_ref["generator"])
    for name in m_ref:
        for i in m_ref[name]:
            for k in m_ref[name][i]:
                assert torch.equal(m_gpu[name][i][k], m_ref[name][i][k]), (name, i, k)
    # the update changed the weights (it was not skipped)
    original = CVPO.from_checkpoint(str(src))
    try:
        w0 = original.learner_group._learner.module[MID].state_dict()
        assert any(not torch.equal(w0[k], w_ref[k]) for k in w_ref)
    finally:
        original.stop()


class _ClaimsCuda(torch.Tensor):
    """A CPU tensor that reports device cuda:0 (a real one cannot exist without CUDA)."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    def detach(self):
        return self

    def cpu(self):
        return self.as_subclass(torch.Tensor).clone()


def test_set_state_maps_cuda_tensors_to_cpu(cpu_checkpoint):
    """In-memory states (e.g. a GPU learner actor's) whose tensors say cuda."""
    from rllib_ext.common.torch_learner import tensors_to_cpu

    src, state, _ = cpu_checkpoint
    plain = torch.tensor([1.0, 2.0])
    array = np.ones(3)
    mapped = tensors_to_cpu(
        {"a": [torch.tensor([1.0, 2.0]).as_subclass(_ClaimsCuda)], "b": (plain, array)}
    )
    assert type(mapped["a"][0]) is torch.Tensor and mapped["a"][0].device.type == "cpu"
    assert torch.equal(mapped["a"][0], plain)
    assert mapped["b"][0] is plain and mapped["b"][1] is array  # CPU / numpy untouched

    state = copy.deepcopy(state)
    trust = state[LEARNER_STATE_KEY][MID]["trust_region"]
    alpha = np.float32(trust["alpha_mu"]) + np.float32(0.25)
    trust["alpha_mu"] = torch.as_tensor(alpha).as_subclass(_ClaimsCuda)
    for entry in state["optimizer"].values():
        for moments in entry["state"]["state"].values():
            moments["exp_avg"] = torch.as_tensor(moments["exp_avg"]).as_subclass(_ClaimsCuda)
    algo = CVPO.from_checkpoint(str(src))
    try:
        learner = algo.learner_group._learner
        learner.set_state(state)
        restored = learner.get_cvpo_state()[MID]["trust_region"]["alpha_mu"]
        assert restored == alpha and restored.dtype == np.float32
        opt = learner.get_optimizer(MID, "critic")
        assert all(type(s["exp_avg"]) is torch.Tensor for s in opt.state.values())
    finally:
        algo.stop()
