"""The cluster definitions in cluster/ are valid, safe and big enough, checked offline.

No test here needs cloud credentials or network access: the `ray up` configs are
validated against the schema shipped inside the installed Ray and by Ray's own
prepare_config/validate_config, the KubeRay manifest by the fields KubeRay needs,
and the capacity checks are plain bin-packing over the configs' node types.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def _load_checker():
    """cluster/check.py, a tool beside the configs rather than an installed module."""
    spec = importlib.util.spec_from_file_location("cluster_check", CLUSTER / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cc = _load_checker()
AWS = CLUSTER / "aws.yaml"
GCP = CLUSTER / "gcp.yaml"
KUBERAY = CLUSTER / "kuberay.yaml"
CLUSTER_YAMLS = sorted(p for p in CLUSTER.glob("*") if p.suffix in (".yaml", ".yml"))
VM_CONFIGS = [AWS, GCP]

# The canonical request: 64 single-CPU EnvRunners and one GPU learner.
REQUEST = {
    "num_env_runners": 64,
    "num_cpus_per_env_runner": 1,
    "num_learners": 1,
    "num_gpus_per_learner": 1,
    "num_cpus_for_main_process": 1,
}


def _write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------ the files exist


def test_checker_runs_as_a_script_from_the_repository_root():
    """`python cluster/check.py` validates every definition; --request checks capacity."""

    def run(*args):
        return subprocess.run(
            [sys.executable, "cluster/check.py", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    out = run()
    assert out.returncode == 0, out.stdout + out.stderr
    for p in CLUSTER_YAMLS:
        assert f"{p.relative_to(ROOT)}: valid" in out.stdout, out.stdout
    request = json.dumps(REQUEST)
    out = run(str(AWS), "--request", request)
    assert out.returncode == 0 and "fits:" in out.stdout and "concurrent trials" in out.stdout
    too_big = json.dumps(REQUEST | {"num_env_runners": 10_000})
    out = run(str(AWS), "--request", too_big)
    assert out.returncode == 1 and "does not fit" in out.stdout, out.stdout


def test_cluster_folder_holds_the_three_definitions_and_readme():
    assert {p.name for p in CLUSTER_YAMLS} >= {"aws.yaml", "gcp.yaml", "kuberay.yaml"}
    assert (CLUSTER / "README.md").is_file()


# -------------------------------------------------------------- schema validation


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_every_cluster_yaml_validates(path):
    kind = cc.config_kind(path)
    if kind == "autoscaler":
        # Straight against the schema inside the installed Ray ...
        schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
        jsonschema.validate(cc.load_cluster_config(path), json.loads(schema_path.read_text()))
        # ... and through our wrapper, which adds Ray's prepare_config/validate_config.
        prepared = cc.validate_autoscaler_config(path)
        assert prepared["head_node_type"] in prepared["available_node_types"]
    else:
        assert kind == "kuberay"
        manifest = cc.validate_kuberay_manifest(path)
        assert manifest["kind"] == "RayCluster"


def test_validation_is_offline(monkeypatch):
    """Schema + Ray's prepare/validate + capacity checks open no socket, import no SDK."""

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    # Warm the imports first so that only the validation itself is under guard.
    cc.validate_autoscaler_config(AWS)
    sdks = ("boto3", "botocore", "googleapiclient")
    before = {m for m in sdks if m in sys.modules}
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    for path in VM_CONFIGS:
        cc.validate_autoscaler_config(path)
        cc.node_types(path)
        cc.ingress_rules(path)
        assert cc.fits_cluster(REQUEST, path)[0]
    cc.validate_kuberay_manifest(KUBERAY)
    assert {m for m in sdks if m in sys.modules} == before


def test_schema_violations_are_reported_with_their_location(tmp_path):
    cfg = cc.load_cluster_config(AWS)
    cfg["available_node_types"]["cpu_rollout"]["resources"]["CPU"] = "sixteen"
    cfg["not_a_ray_key"] = 1
    with pytest.raises(ValueError) as err:
        cc.validate_autoscaler_config(_write(tmp_path, "bad.yaml", cfg))
    msg = str(err.value)
    assert "2 violation(s)" in msg
    assert "available_node_types/cpu_rollout/resources/CPU" in msg
    assert "not_a_ray_key" in msg


def test_rays_own_validate_config_runs(tmp_path):
    cfg = cc.load_cluster_config(AWS)
    cfg["available_node_types"]["cpu_rollout"]["min_workers"] = 10  # > max_workers 9
    with pytest.raises(ValueError, match="validate_config.*min_workers"):
        cc.validate_autoscaler_config(_write(tmp_path, "min.yaml", cfg))


def test_command_lists_must_be_explicit(tmp_path):
    cfg = cc.load_cluster_config(GCP)
    del cfg["head_setup_commands"]
    with pytest.raises(ValueError, match="head_setup_commands"):
        cc.validate_autoscaler_config(_write(tmp_path, "cmds.yaml", cfg))


def test_kuberay_manifest_fields():
    m = cc.validate_kuberay_manifest(KUBERAY)
    spec = m["spec"]
    assert m["apiVersion"] == "ray.io/v1"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-rollout", "gpu-learner"}
    assert (groups["cpu-rollout"]["minReplicas"], groups["cpu-rollout"]["maxReplicas"]) == (0, 8)
    assert (groups["gpu-learner"]["minReplicas"], groups["gpu-learner"]["maxReplicas"]) == (0, 1)
    types = cc.node_types(KUBERAY)
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["cpu-rollout"]["resources"] == {"CPU": 15}
    assert types["gpu-learner"]["resources"] == {"CPU": 3, "GPU": 1, "learner": 1}


def test_kuberay_validation_catches_inconsistent_replicas(tmp_path):
    m = cc.load_cluster_config(KUBERAY)
    g = m["spec"]["workerGroupSpecs"][0]
    g["replicas"], g["maxReplicas"] = 9, 8
    m["spec"]["enableInTreeAutoscaling"] = False
    m["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    with pytest.raises(ValueError) as err:
        cc.validate_kuberay_manifest(_write(tmp_path, "k.yaml", m))
    msg = str(err.value)
    assert "minReplicas <= replicas <= maxReplicas, got 0 / 9 / 8" in msg
    assert "enableInTreeAutoscaling" in msg
    assert "rayStartParams.num-cpus: must be a string" in msg


# ---------------------------------------------------------------------- node types


@pytest.mark.parametrize("path", VM_CONFIGS, ids=lambda p: p.name)
def test_node_types_and_maxima(path):
    types = cc.node_types(path)
    assert set(types) == {"head", "cpu_rollout", "gpu_learner"}
    assert types["head"] == {
        "resources": {"CPU": 0},
        "min_workers": 0,
        "max_workers": 0,
        "head": True,
    }
    assert types["cpu_rollout"] == {
        "resources": {"CPU": 16},
        "min_workers": 0,
        "max_workers": 8,
        "head": False,
    }
    assert types["gpu_learner"] == {
        "resources": {"CPU": 4, "GPU": 1, "learner": 1},
        "min_workers": 0,
        "max_workers": 1,
        "head": False,
    }
    # The global cap admits every type at its maximum at once.
    assert cc.load_cluster_config(path)["max_workers"] == 8 + 1


# vCPUs of the instance types the configs may use (Ray's CPU count must not exceed them).
VCPUS = {
    "m7i.xlarge": 4,
    "c7i.4xlarge": 16,
    "g6.xlarge": 4,
    "g5.xlarge": 4,
    "n2-standard-4": 4,
    "n2-standard-16": 16,
    "g2-standard-4": 4,
    "n1-standard-8": 8,
}


@pytest.mark.parametrize("path", VM_CONFIGS, ids=lambda p: p.name)
def test_ray_resources_match_the_machines(path):
    cfg = cc.load_cluster_config(path)
    for name, nt in cfg["available_node_types"].items():
        nc = nt["node_config"]
        machine = nc.get("InstanceType") or nc.get("machineType")
        assert machine in VCPUS, f"{name}: unknown machine {machine}"
        assert nt["resources"]["CPU"] <= VCPUS[machine]
    gpu = cfg["available_node_types"]["gpu_learner"]["node_config"]
    assert (gpu.get("InstanceType") or gpu.get("machineType")) in {
        "g6.xlarge",
        "g5.xlarge",
        "g2-standard-4",
    }


@pytest.mark.parametrize("path", VM_CONFIGS, ids=lambda p: p.name)
def test_every_node_runs_ubuntu_2404(path):
    """Ray refuses nodes whose Python differs from the head's: one OS release for all."""
    cfg = cc.load_cluster_config(path)
    for name, nt in cfg["available_node_types"].items():
        nc = nt["node_config"]
        if "ImageId" in nc:
            assert "ubuntu-24.04" in nc["ImageId"] or "ubuntu/server/24.04" in nc["ImageId"], name
        else:
            image = nc["disks"][0]["initializeParams"]["sourceImage"]
            assert "2404" in image, name


@pytest.mark.parametrize("path", VM_CONFIGS, ids=lambda p: p.name)
def test_install_and_start_use_the_project_venv(path):
    cfg = cc.load_cluster_config(path)
    assert cfg["file_mounts"] == {"~/cvpo": "."}
    assert ".venv" in cfg["rsync_exclude"]
    setup = " ".join(cfg["setup_commands"])
    assert "cd ~/cvpo && make install" in setup
    assert "PYTHON=/usr/bin/python3" in setup
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    ray_calls = [c for c in starts if re.search(r"\bray (start|stop)\b", c)]
    assert ray_calls and all("~/cvpo/.venv/bin/ray " in c for c in ray_calls)
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])


def test_makefile_honours_torch_index_url():
    """The configs pass TORCH_INDEX_URL to `make install` (CPU wheel on CPU nodes).

    Contract: when set and non-empty, the torch install line gets
    `--index-url $(TORCH_INDEX_URL)`; when empty, no index option is added.
    """
    url = "https://download.pytorch.org/whl/cpu"

    def dry_run(*args):
        out = subprocess.run(
            ["make", "-n", "-B", "install", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [line for line in out.splitlines() if "pip install" in line and "torch" in line]

    with_url = dry_run(f"TORCH_INDEX_URL={url}")
    assert any(f"--index-url {url}" in line for line in with_url), with_url
    assert not any("--index-url" in line for line in dry_run("TORCH_INDEX_URL="))


# ------------------------------------------------------------------------- security


def test_aws_opens_only_ssh():
    rules = cc.ingress_rules(AWS)
    assert rules, "Ray's own SSH rule must be reported"
    assert cc.opened_ports(AWS) == [22]
    assert all(r["protocol"] == "tcp" and (r["from_port"], r["to_port"]) == (22, 22) for r in rules)
    sg = cc.load_cluster_config(AWS)["provider"]["security_group"]
    assert sg["GroupName"] == "ray-autoscaler-cvpo"
    assert all(p.get("FromPort") == p.get("ToPort") == 22 for p in sg["IpPermissions"])
    for nt in cc.load_cluster_config(AWS)["available_node_types"].values():
        assert "SecurityGroupIds" not in nt["node_config"]


def test_rays_default_aws_rule_is_ssh_only():
    """Read from the installed Ray source: the only internet-facing rule Ray adds."""
    assert cc.ray_default_aws_ingress() == [
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    ]


def test_ingress_check_catches_an_opened_dashboard(tmp_path):
    cfg = cc.load_cluster_config(AWS)
    cfg["provider"]["security_group"]["IpPermissions"] = [
        {
            "FromPort": 8265,
            "ToPort": 8265,
            "IpProtocol": "tcp",
            "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
        }
    ]
    assert cc.opened_ports(_write(tmp_path, "open.yaml", cfg)) == [22, 8265]
    m = cc.load_cluster_config(KUBERAY)
    m["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    assert cc.opened_ports(_write(tmp_path, "lb.yaml", m)) == [6379, 8265, 10001]


def test_gcp_opens_nothing_and_ray_creates_no_firewall():
    assert cc.ingress_rules(GCP) == []
    gcp_src = Path(ray.autoscaler.__file__).parent / "_private" / "gcp"
    mentions = [p.name for p in gcp_src.glob("*.py") if "firewall" in p.read_text().lower()]
    assert mentions == [], "Ray's GCP launcher now manages firewalls: re-check cluster/gcp.yaml"
    cfg = cc.load_cluster_config(GCP)
    assert cfg["provider"]["project_id"] is None  # never a guessed project


def test_kuberay_exposes_nothing():
    assert cc.ingress_rules(KUBERAY) == []
    assert cc.load_cluster_config(KUBERAY)["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"


@pytest.mark.parametrize("path", VM_CONFIGS, ids=lambda p: p.name)
def test_dashboard_listens_on_loopback_only(path):
    head = " ".join(cc.load_cluster_config(path)["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head


# ------------------------------------------------------------------------- capacity


@pytest.mark.parametrize("path", VM_CONFIGS, ids=lambda p: p.name)
def test_fits_a_reasonable_request(path):
    ok, reason = cc.fits_cluster(REQUEST, path)
    assert ok, reason
    assert "64 env runner(s) x {1 CPU} on cpu_rollout" in reason
    assert "1 learner(s) x {1 GPU} on gpu_learner" in reason
    assert "nodes used: 4 cpu_rollout, 1 gpu_learner" in reason


def test_fits_exactly_the_maximum_and_rejects_one_more():
    ok, reason = cc.fits_cluster({**REQUEST, "num_env_runners": 128}, AWS)
    assert ok, reason
    assert "nodes used: 8 cpu_rollout, 1 gpu_learner" in reason

    ok, reason = cc.fits_cluster({**REQUEST, "num_env_runners": 129}, AWS)
    assert not ok
    assert "129 env runner(s)" in reason
    assert "host at most 128" in reason
    assert "cpu_rollout: 8 node(s) x {16 CPU} -> 128" in reason


def test_rejects_what_no_node_can_hold():
    ok, reason = cc.fits_cluster({**REQUEST, "num_learners": 2}, AWS)
    assert not ok and "2 learner(s)" in reason and "host at most 1" in reason

    ok, reason = cc.fits_cluster(
        {**REQUEST, "num_env_runners": 2, "num_cpus_per_env_runner": 17}, AWS
    )
    assert not ok and "host at most 0" in reason

    ok, reason = cc.fits_cluster(
        {**REQUEST, "num_gpus_per_env_runner": 1, "num_env_runners": 1}, AWS
    )
    assert not ok  # the only GPU belongs to the learner


def test_local_learner_and_pinned_cpu_learner():
    ok, reason = cc.fits_cluster(
        {"num_env_runners": 16, "num_learners": 0, "num_gpus_per_learner": 1}, AWS
    )
    assert ok and "1 main process(s) x {1 CPU, 1 GPU} on gpu_learner" in reason

    ok, reason = cc.fits_cluster(
        {"num_env_runners": 16, "num_learners": 1, "custom_resources_per_learner": {"learner": 1}},
        AWS,
    )
    assert ok and "1 learner(s) x {1 CPU, 1 learner} on gpu_learner" in reason


def test_global_max_workers_caps_the_node_count(tmp_path):
    cfg = cc.load_cluster_config(AWS)
    cfg["max_workers"] = 4
    ok, reason = cc.fits_cluster(REQUEST, _write(tmp_path, "cap.yaml", cfg))
    assert not ok
    assert "needs 5 worker nodes but the global max_workers is 4" in reason


def test_max_concurrent_trials():
    # One GPU node: GPU-learner trials of a sweep run one at a time.
    assert cc.max_concurrent_trials(REQUEST, AWS) == 1
    # CPU learners: 16 runners + 1 learner CPU + 1 main CPU = 18 CPUs per trial, and
    # 8 x 16 + 4 = 132 CPUs in all (runners only on the 128 of the CPU nodes) -> 7.
    cpu_trial = {"num_env_runners": 16, "num_learners": 1, "num_gpus_per_learner": 0}
    assert cc.max_concurrent_trials(cpu_trial, AWS) == 7


@pytest.mark.parametrize(
    "request_",
    [
        {
            "num_env_runners": 3,
            "num_cpus_per_env_runner": 2,
            "num_learners": 1,
            "num_gpus_per_learner": 1,
        },
        {"num_env_runners": 4, "num_learners": 0, "num_gpus_per_learner": 1},
        {
            "num_env_runners": 2,
            "num_learners": 2,
            "num_cpus_per_learner": 3,
            "custom_resources_per_learner": {"learner": 1},
        },
        {"num_env_runners": 5, "evaluation_num_env_runners": 2, "num_cpus_for_main_process": 2},
    ],
)
def test_bundles_match_rllibs_own_resource_request(request_):
    """trial_bundles mirrors Algorithm.default_resource_request of the installed RLlib."""
    from ray.rllib.algorithms.ppo import PPO, PPOConfig

    r = dict(request_)
    config = (
        PPOConfig()
        .env_runners(
            num_env_runners=r.pop("num_env_runners"),
            num_cpus_per_env_runner=r.pop("num_cpus_per_env_runner", 1),
        )
        .learners(
            num_learners=r.pop("num_learners", 0),
            num_gpus_per_learner=r.pop("num_gpus_per_learner", 0),
            num_cpus_per_learner=r.pop("num_cpus_per_learner", "auto"),
            custom_resources_per_learner=r.pop("custom_resources_per_learner", {}),
        )
        .resources(num_cpus_for_main_process=r.pop("num_cpus_for_main_process", 1))
        .evaluation(evaluation_num_env_runners=r.pop("evaluation_num_env_runners", 0))
    )
    assert not r
    theirs = PPO.default_resource_request(config).bundles
    ours = [b for _, b in cc.trial_bundles(request_)]

    def canon(bundles):
        return sorted(
            json.dumps({k: float(v) for k, v in b.items() if v}, sort_keys=True) for b in bundles
        )

    assert canon(ours) == canon(theirs)


# ------------------------------------------------------- tuned examples fit aws.yaml

TUNED_ROOT = ROOT / "tuned_examples"
TUNED = cc.tuned_example_files(TUNED_ROOT)


def test_tuned_example_glob_sees_every_yaml_file():
    """The list the consistency test runs over is complete (possibly empty)."""
    found = sorted(
        Path(d) / f
        for d, _, files in os.walk(TUNED_ROOT)
        for f in files
        if f.endswith((".yaml", ".yml"))
    )
    assert TUNED == found


def test_tuned_example_reading_on_temp_files(tmp_path):
    """The glob and the request extraction, on files written here (always runs)."""
    (tmp_path / "cvpo" / "sub").mkdir(parents=True)
    (tmp_path / "cvpo" / "notes.md").write_text("not an experiment")
    flat = _write(
        tmp_path / "cvpo",
        "flat.yaml",
        {
            "cvpo-point-goal": {
                "run": "CVPO",
                "env": "SafetyPointGoal1-v0",
                "config": {
                    "num_env_runners": {"grid_search": [8, 32]},
                    "num_learners": 1,
                    "num_gpus_per_learner": 1,
                    "cost_limit": {"grid_search": [10, 25]},
                },
            }
        },
    )
    nested = _write(
        tmp_path / "cvpo" / "sub",
        "nested.yml",
        {
            "cvpo-car-goal": {
                "run": "CVPO",
                "config": {
                    "env_runners": {"num_env_runners": 16, "num_cpus_per_env_runner": 2},
                    "learners": {
                        "num_learners": 1,
                        "num_gpus_per_learner": 1,
                        "custom_resources_per_learner": {"learner": 1},
                    },
                },
            },
            "too-big": {"run": "CVPO", "config": {"num_workers": 200}},  # deprecated name
        },
    )
    assert cc.tuned_example_files(tmp_path) == [flat, nested]
    assert cc.experiment_resource_requests(flat) == {
        "cvpo-point-goal": {"num_env_runners": 32, "num_learners": 1, "num_gpus_per_learner": 1}
    }
    requests = cc.experiment_resource_requests(nested)
    assert requests["cvpo-car-goal"] == {
        "num_env_runners": 16,
        "num_cpus_per_env_runner": 2,
        "num_learners": 1,
        "num_gpus_per_learner": 1,
        "custom_resources_per_learner": {"learner": 1},
    }
    assert requests["too-big"] == {"num_env_runners": 200}
    assert cc.fits_cluster(cc.experiment_resource_requests(flat)["cvpo-point-goal"], AWS)[0]
    assert cc.fits_cluster(requests["cvpo-car-goal"], AWS)[0]
    ok, reason = cc.fits_cluster(requests["too-big"], AWS)
    assert not ok and "200 env runner(s)" in reason


if TUNED:

    @pytest.mark.parametrize("path", TUNED, ids=lambda p: str(p.relative_to(TUNED_ROOT)))
    def test_tuned_example_fits_aws(path):
        for name, request in cc.experiment_resource_requests(path).items():
            ok, reason = cc.fits_cluster(request, AWS)
            assert ok, f"{path.name}: {name}: {reason}"
