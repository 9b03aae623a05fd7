"""Offline checks for the cluster definitions next to this file (``cluster/*.yaml``).

A tool, not part of the installed packages. From the repository root::

    .venv/bin/python cluster/check.py                 # validate every cluster/*.yaml
    .venv/bin/python cluster/check.py cluster/aws.yaml \
        --request '{"num_env_runners": 64, "num_learners": 1, "num_gpus_per_learner": 1}'

``tests/test_cluster_configs.py`` loads this file by path and tests every function.
Everything here runs without cloud credentials and without network access:

* :func:`validate_autoscaler_config` checks a ``ray up`` YAML (aws / gcp) against
  the JSON schema shipped inside the installed Ray (``ray/autoscaler/ray-schema.json``)
  and then runs Ray's own ``prepare_config`` + ``validate_config``
  (``ray.autoscaler._private.util``). Both only read local files (the schema and
  the provider's ``defaults.yaml``); neither imports a cloud SDK nor opens a socket.
  The provider bootstrap that ``ray up`` runs afterwards (key pairs, IAM, subnets,
  security groups) does talk to the cloud and is deliberately not called.
* :func:`validate_kuberay_manifest` checks the fields KubeRay needs in a
  ``RayCluster`` manifest.
* :func:`node_types`, :func:`fits_cluster` and :func:`max_concurrent_trials`
  reason about capacity: can the node types, at their maximum counts, host the
  actors an RLlib experiment asks for?
* :func:`ingress_rules` lists what is reachable from outside the cluster.
* :func:`tuned_example_files` / :func:`experiment_resource_requests` read the
  resource requests out of Tune experiment YAML files (``tuned_examples/``).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent

__all__ = [
    "COMMAND_KEYS",
    "config_kind",
    "experiment_resource_requests",
    "fits_cluster",
    "ingress_rules",
    "load_cluster_config",
    "main",
    "max_concurrent_trials",
    "node_types",
    "opened_ports",
    "ray_default_aws_ingress",
    "trial_bundles",
    "tuned_example_files",
    "validate_autoscaler_config",
    "validate_kuberay_manifest",
]

# Top-level command lists of a `ray up` config. Ray fills any that are missing from
# the provider's defaults.yaml (a shallow merge), and those defaults pip-install
# into the system Python, so ours must set every one of them explicitly.
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)

# Ports reachable from outside when a KubeRay head service is exposed.
_KUBERAY_EXPOSING_SERVICE_TYPES = ("NodePort", "LoadBalancer")


# --------------------------------------------------------------------------- loading


def load_cluster_config(path: str | os.PathLike) -> dict:
    """Load a cluster YAML as a dict.

    A multi-document file (as a Kubernetes manifest may be) returns the document
    whose ``kind`` is ``RayCluster``.
    """
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not docs:
        raise ValueError(f"{path}: empty YAML file")
    if len(docs) > 1:
        clusters = [d for d in docs if isinstance(d, dict) and d.get("kind") == "RayCluster"]
        if len(clusters) != 1:
            raise ValueError(
                f"{path}: {len(docs)} YAML documents but {len(clusters)} of kind RayCluster"
            )
        return clusters[0]
    if not isinstance(docs[0], dict):
        raise ValueError(f"{path}: top level must be a mapping, got {type(docs[0]).__name__}")
    return docs[0]


def config_kind(config_or_path: dict | str | os.PathLike) -> str:
    """``"autoscaler"`` for a ``ray up`` config, ``"kuberay"`` for a RayCluster manifest."""
    cfg = _as_config(config_or_path)
    if cfg.get("kind") == "RayCluster":
        return "kuberay"
    if "provider" in cfg:
        return "autoscaler"
    raise ValueError("neither a `ray up` config (no `provider`) nor a KubeRay RayCluster")


def _as_config(config_or_path: dict | str | os.PathLike) -> dict:
    if isinstance(config_or_path, dict):
        return config_or_path
    return load_cluster_config(config_or_path)


# ------------------------------------------------------------------ ray up validation


def _schema_path() -> Path:
    import ray.autoscaler

    return Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def validate_autoscaler_config(path: str | os.PathLike) -> dict:
    """Validate a ``ray up`` config offline; return Ray's prepared config.

    Steps: (1) the JSON schema shipped with the installed Ray, every violation
    reported with its location; (2) every command list set explicitly (see
    :data:`COMMAND_KEYS`); (3) Ray's ``prepare_config`` (merges the provider's
    ``defaults.yaml``) and ``validate_config`` (schema again, head type, the
    ``min_workers`` sum against ``max_workers``). Raises ``ValueError``.
    """
    import jsonschema

    path = Path(path)
    config = load_cluster_config(path)
    if config_kind(config) != "autoscaler":
        raise ValueError(f"{path}: not a `ray up` config")

    schema = json.loads(_schema_path().read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_cls(schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        lines = [
            f"  at {'/'.join(str(p) for p in e.path) or '<root>'}: {e.message}" for e in errors
        ]
        raise ValueError(
            f"{path}: {len(errors)} violation(s) of Ray's autoscaler schema "
            f"({_schema_path()}):\n" + "\n".join(lines)
        )

    missing = [k for k in COMMAND_KEYS if k not in config]
    if missing:
        raise ValueError(
            f"{path}: {', '.join(missing)} not set; Ray would fill them from the "
            "provider's defaults.yaml, which installs into the system Python. "
            "Set them explicitly (an empty list is fine)."
        )

    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except Exception as e:  # Ray raises ValueError, RuntimeError and jsonschema errors
        raise ValueError(f"{path}: rejected by Ray's validate_config: {e}") from e
    return prepared


# ---------------------------------------------------------------- KubeRay validation


def _parse_ray_start_resources(value: Any) -> dict:
    """Parse ``rayStartParams.resources``: KubeRay's documented form is a JSON object
    wrapped in one more pair of quotes, e.g. ``'"{\\"learner\\": 1}"'``."""
    if isinstance(value, dict):
        return value
    text = str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].replace('\\"', '"')
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"rayStartParams.resources is not a JSON object: {value!r}") from e
    if not isinstance(parsed, dict):
        raise ValueError(f"rayStartParams.resources is not a JSON object: {value!r}")
    return parsed


def _check_pod_template(where: str, template: Any, problems: list[str]) -> dict | None:
    containers = (
        (((template or {}).get("spec") or {}).get("containers"))
        if isinstance(template, dict)
        else None
    )
    if not isinstance(containers, list) or not containers:
        problems.append(f"{where}.template.spec.containers: missing or empty")
        return None
    c0 = containers[0]
    if not isinstance(c0, dict):
        problems.append(f"{where}.template.spec.containers[0]: not a mapping")
        return None
    if not isinstance(c0.get("image"), str) or not c0["image"].strip():
        problems.append(f"{where}.template.spec.containers[0].image: missing")
    if not isinstance(c0.get("name"), str) or not c0["name"]:
        problems.append(f"{where}.template.spec.containers[0].name: missing")
    limits = ((c0.get("resources") or {}).get("limits")) or {}
    for key in ("cpu", "memory"):
        if key not in limits:
            problems.append(
                f"{where}.template.spec.containers[0].resources.limits.{key}: missing "
                "(Ray sizes the node from the container limits)"
            )
    return c0


def _check_ray_start_params(where: str, params: Any, problems: list[str]) -> None:
    if not isinstance(params, dict):
        problems.append(f"{where}.rayStartParams: must be a mapping (may be empty)")
        return
    for k, v in params.items():
        if not isinstance(v, str):
            problems.append(
                f"{where}.rayStartParams.{k}: must be a string (the CRD types it "
                f"map[string]string), got {type(v).__name__}"
            )
    if "resources" in params:
        try:
            _parse_ray_start_resources(params["resources"])
        except ValueError as e:
            problems.append(f"{where}.{e}")


def validate_kuberay_manifest(path: str | os.PathLike) -> dict:
    """Check the fields KubeRay needs in a RayCluster manifest; return it.

    apiVersion ``ray.io/v1``, kind ``RayCluster``, ``metadata.name``,
    ``spec.rayVersion`` equal to the installed Ray, ``enableInTreeAutoscaling:
    true``, a head group with ``rayStartParams`` (string values) and a first
    container with an image and cpu/memory limits, and worker groups with a unique
    ``groupName`` and ``0 <= minReplicas <= replicas <= maxReplicas``.
    Raises ``ValueError`` listing every problem found.
    """
    import ray

    path = Path(path)
    m = load_cluster_config(path)
    problems: list[str] = []
    if m.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion: expected ray.io/v1, got {m.get('apiVersion')!r}")
    if m.get("kind") != "RayCluster":
        problems.append(f"kind: expected RayCluster, got {m.get('kind')!r}")
    if not (m.get("metadata") or {}).get("name"):
        problems.append("metadata.name: missing")
    spec = m.get("spec")
    if not isinstance(spec, dict):
        problems.append("spec: missing")
        spec = {}
    if str(spec.get("rayVersion", "")) != ray.__version__:
        problems.append(
            f"spec.rayVersion: {spec.get('rayVersion')!r} differs from the installed "
            f"Ray {ray.__version__} that the project pins"
        )
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("spec.enableInTreeAutoscaling: must be true (autoscaling worker groups)")

    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        problems.append("spec.headGroupSpec: missing")
    else:
        _check_ray_start_params("spec.headGroupSpec", head.get("rayStartParams"), problems)
        _check_pod_template("spec.headGroupSpec", head.get("template"), problems)

    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        problems.append("spec.workerGroupSpecs: missing or empty")
        groups = []
    seen: set[str] = set()
    for i, g in enumerate(groups):
        where = f"spec.workerGroupSpecs[{i}]"
        if not isinstance(g, dict):
            problems.append(f"{where}: not a mapping")
            continue
        name = g.get("groupName")
        if not isinstance(name, str) or not name:
            problems.append(f"{where}.groupName: missing")
        elif name in seen:
            problems.append(f"{where}.groupName: duplicate {name!r}")
        else:
            seen.add(name)
            where = f"spec.workerGroupSpecs[{name}]"
        counts = {k: g.get(k) for k in ("minReplicas", "replicas", "maxReplicas")}
        bad = [k for k, v in counts.items() if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            problems.append(f"{where}: {', '.join(bad)} must be integers")
        elif not (0 <= counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"]):
            problems.append(
                f"{where}: need 0 <= minReplicas <= replicas <= maxReplicas, got "
                f"{counts['minReplicas']} / {counts['replicas']} / {counts['maxReplicas']}"
            )
        _check_ray_start_params(where, g.get("rayStartParams"), problems)
        _check_pod_template(where, g.get("template"), problems)

    if problems:
        raise ValueError(
            f"{path}: invalid KubeRay RayCluster:\n" + "\n".join(f"  {p}" for p in problems)
        )
    return m


# ------------------------------------------------------------------------ node types


def _k8s_quantity(value: Any) -> float:
    """Parse a Kubernetes CPU/GPU quantity ("500m", "4", 2) into a number."""
    text = str(value).strip()
    if text.endswith("m"):
        return float(text[:-1]) / 1000.0
    return float(text)


def node_types(path: str | os.PathLike) -> dict[str, dict]:
    """Node types with their Ray resources and worker-count bounds.

    Returns ``{name: {"resources": {...}, "min_workers": int, "max_workers": int,
    "head": bool}}``. For aws/gcp the numbers come from Ray's prepared config
    (so defaults, e.g. the head's ``max_workers: 0``, are applied). A KubeRay
    manifest is read too: resources from ``rayStartParams`` (``num-cpus``,
    ``num-gpus``, ``resources``) or else the container limits, counts from
    ``minReplicas``/``maxReplicas``.
    """
    cfg = load_cluster_config(path)
    if config_kind(cfg) == "kuberay":
        return _kuberay_node_types(validate_kuberay_manifest(path))
    prepared = validate_autoscaler_config(path)
    head = prepared["head_node_type"]
    out: dict[str, dict] = {}
    for name, nt in prepared["available_node_types"].items():
        resources = dict(nt.get("resources") or {})
        if "CPU" not in resources:
            raise ValueError(
                f"{path}: node type {name!r} has no explicit CPU resource; offline "
                "capacity checks need it (Ray would otherwise ask the cloud)"
            )
        out[name] = {
            "resources": resources,
            "min_workers": int(nt.get("min_workers", 0)),
            "max_workers": int(nt.get("max_workers", 0)),
            "head": name == head,
        }
    return out


def _kuberay_group_resources(group: dict) -> dict:
    params = group.get("rayStartParams") or {}
    c0 = group["template"]["spec"]["containers"][0]
    limits = (c0.get("resources") or {}).get("limits") or {}
    res: dict[str, float] = {}
    res["CPU"] = (
        float(params["num-cpus"])
        if "num-cpus" in params
        else math.floor(_k8s_quantity(limits["cpu"]))
    )
    gpus = params.get("num-gpus", limits.get("nvidia.com/gpu"))
    if gpus is not None and _k8s_quantity(gpus) > 0:
        res["GPU"] = _k8s_quantity(gpus)
    if "resources" in params:
        res.update(_parse_ray_start_resources(params["resources"]))
    return {k: (int(v) if float(v).is_integer() else v) for k, v in res.items()}


def _kuberay_node_types(m: dict) -> dict[str, dict]:
    spec = m["spec"]
    out = {
        "head": {
            "resources": _kuberay_group_resources(spec["headGroupSpec"]),
            "min_workers": 0,
            "max_workers": 0,
            "head": True,
        }
    }
    for g in spec["workerGroupSpecs"]:
        out[g["groupName"]] = {
            "resources": _kuberay_group_resources(g),
            "min_workers": g["minReplicas"],
            "max_workers": g["maxReplicas"],
            "head": False,
        }
    return out


def _global_max_workers(path: str | os.PathLike) -> int | None:
    cfg = load_cluster_config(path)
    if config_kind(cfg) == "kuberay":
        return None
    return int(validate_autoscaler_config(path)["max_workers"])


# ---------------------------------------------------------------------- ingress rules


def ray_default_aws_ingress() -> list[dict]:
    """The internet-facing rule Ray's AWS launcher adds to the security group it creates.

    Read from the installed Ray source (``_create_default_ssh_inbound_rules`` in
    ``ray/autoscaler/_private/aws/config.py``) with ``ast`` rather than imported,
    because that module needs boto3 at import time. Besides this rule Ray adds one
    that allows all traffic between members of the group (not reachable from outside)
    and then ``provider.security_group.IpPermissions`` from the config.
    """
    import ray.autoscaler

    src = Path(ray.autoscaler.__file__).parent / "_private" / "aws" / "config.py"
    tree = ast.parse(src.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "_create_default_ssh_inbound_rules":
            returns = [n for n in ast.walk(node) if isinstance(n, ast.Return)]
            if len(returns) == 1 and returns[0].value is not None:
                return ast.literal_eval(returns[0].value)
    raise ValueError(
        f"{src}: could not read Ray's default AWS ingress rules; re-check the "
        "security assumptions in cluster/aws.yaml for this Ray version"
    )


def _aws_permission_to_rule(perm: dict, origin: str) -> dict:
    proto = str(perm.get("IpProtocol", "")).lower()
    if proto in ("-1", "all"):
        from_port, to_port = 0, 65535
    else:
        from_port, to_port = int(perm.get("FromPort", 0)), int(perm.get("ToPort", 65535))
    sources = [r.get("CidrIp") for r in perm.get("IpRanges", [])]
    sources += [r.get("CidrIpv6") for r in perm.get("Ipv6Ranges", [])]
    sources += [g.get("GroupId") for g in perm.get("UserIdGroupPairs", [])]
    sources += [p.get("PrefixListId") for p in perm.get("PrefixListIds", [])]
    return {
        "protocol": proto,
        "from_port": from_port,
        "to_port": to_port,
        "sources": sources,
        "origin": origin,
    }


def ingress_rules(path: str | os.PathLike) -> list[dict]:
    """Rules that open ports of cluster nodes to sources outside the cluster.

    Each rule is ``{"protocol", "from_port", "to_port", "sources", "origin"}``.

    * aws: Ray's own default SSH rule (see :func:`ray_default_aws_ingress`) plus the
      config's ``provider.security_group.IpPermissions``. A node type that names
      its own ``SecurityGroupIds`` is reported with ``from_port``/``to_port`` None
      (its rules live outside the config and cannot be checked offline).
    * gcp: Ray's GCP launcher creates no firewall rules (it has no firewall code);
      the VPC's existing rules apply, which live outside the config, so the list is
      empty. See cluster/README.md for the default network's rules.
    * kuberay: the head container's ports when ``headGroupSpec.serviceType`` is
      NodePort or LoadBalancer; nothing for ClusterIP.
    """
    cfg = load_cluster_config(path)
    kind = config_kind(cfg)
    if kind == "kuberay":
        head = cfg["spec"]["headGroupSpec"]
        if head.get("serviceType", "ClusterIP") not in _KUBERAY_EXPOSING_SERVICE_TYPES:
            return []
        ports = head["template"]["spec"]["containers"][0].get("ports") or []
        return [
            {
                "protocol": str(p.get("protocol", "TCP")).lower(),
                "from_port": int(p["containerPort"]),
                "to_port": int(p["containerPort"]),
                "sources": ["0.0.0.0/0"],
                "origin": f"headGroupSpec.serviceType={head['serviceType']}",
            }
            for p in ports
        ]
    provider = cfg["provider"]
    ptype = provider.get("type")
    if ptype == "aws":
        rules = [_aws_permission_to_rule(p, "ray-default") for p in ray_default_aws_ingress()]
        for perm in (provider.get("security_group") or {}).get("IpPermissions") or []:
            rules.append(_aws_permission_to_rule(perm, "provider.security_group"))
        for name, nt in cfg.get("available_node_types", {}).items():
            for sg in (nt.get("node_config") or {}).get("SecurityGroupIds") or []:
                rules.append(
                    {
                        "protocol": None,
                        "from_port": None,
                        "to_port": None,
                        "sources": [sg],
                        "origin": f"{name}.node_config.SecurityGroupIds",
                    }
                )
        return rules
    if ptype == "gcp":
        return []
    raise ValueError(f"{path}: ingress rules unknown for provider type {ptype!r}")


def opened_ports(path: str | os.PathLike) -> list[int | None]:
    """Sorted distinct ports opened to outside sources (None: not checkable offline)."""
    ports: set[int | None] = set()
    for r in ingress_rules(path):
        if r["from_port"] is None:
            ports.add(None)
        else:
            ports.update(range(r["from_port"], r["to_port"] + 1))
    return sorted(ports, key=lambda p: (p is None, p or 0))


# ----------------------------------------------------------------- capacity planning

# Request keys understood by fits_cluster (RLlib AlgorithmConfig attribute names).
_REQUEST_DEFAULTS: dict[str, Any] = {
    "num_env_runners": 0,
    "num_cpus_per_env_runner": 1,
    "num_gpus_per_env_runner": 0,
    "custom_resources_per_env_runner": {},
    "evaluation_num_env_runners": 0,
    "num_learners": 0,
    "num_cpus_per_learner": "auto",
    "num_gpus_per_learner": 0,
    "custom_resources_per_learner": {},
    "num_aggregator_actors_per_learner": 0,
    "num_cpus_for_main_process": 1,
    "custom_resources_for_main_process": {},
}


def trial_bundles(request: dict) -> list[tuple[str, dict]]:
    """The resource bundles one RLlib trial asks for, as ``(role, bundle)`` pairs.

    Mirrors ``Algorithm.default_resource_request`` of RLlib's new API stack
    (``ray/rllib/algorithms/utils.py``: ``_get_main_process_bundle``,
    ``_get_env_runner_bundles``, ``_get_learner_bundles``): with ``num_learners=0``
    the learner lives in the main process, which then also holds its GPUs.
    """
    unknown = set(request) - set(_REQUEST_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown request keys: {sorted(unknown)}")
    r = {**_REQUEST_DEFAULTS, **request}

    if r["num_cpus_per_learner"] != "auto":
        cpus_per_learner = r["num_cpus_per_learner"]
    elif r["num_gpus_per_learner"] == 0:
        cpus_per_learner = 1
    else:
        cpus_per_learner = 0

    if r["num_learners"] == 0:
        main = {
            "CPU": max(cpus_per_learner, r["num_cpus_for_main_process"]),
            "GPU": r["num_gpus_per_learner"],
            **r["custom_resources_for_main_process"],
        }
        learners = [("aggregator", {"CPU": 1})] * r["num_aggregator_actors_per_learner"]
    else:
        main = {
            "CPU": r["num_cpus_for_main_process"],
            "GPU": 0,
            **r["custom_resources_for_main_process"],
        }
        learner = {
            "CPU": cpus_per_learner + r["num_aggregator_actors_per_learner"],
            "GPU": r["num_gpus_per_learner"],
            **(r["custom_resources_per_learner"] or {}),
        }
        learners = [("learner", learner)] * r["num_learners"]
    runner = {
        "CPU": r["num_cpus_per_env_runner"],
        "GPU": r["num_gpus_per_env_runner"],
        **r["custom_resources_per_env_runner"],
    }
    runners = [("env_runner", runner)] * r["num_env_runners"]
    runners += [("eval_env_runner", runner)] * r["evaluation_num_env_runners"]
    return [("main_process", main), *learners, *runners]


def _node_pool(types: dict[str, dict]) -> list[dict]:
    pool = []
    for name, nt in types.items():
        count = 1 if nt["head"] else nt["max_workers"]
        for i in range(count):
            pool.append(
                {
                    "type": name,
                    "index": i,
                    "head": nt["head"],
                    "gpu": nt["resources"].get("GPU", 0) > 0,
                    "free": {k: float(v) for k, v in nt["resources"].items()},
                    "used": False,
                }
            )
    return pool


def _fits(bundle: dict, free: dict) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= float(v) for k, v in bundle.items() if v)


def _allowed(role: str, bundle: dict, node: dict) -> bool:
    # Policy (conservative): CPU-only env runners go to nodes without GPUs, so the
    # learner node keeps its CPUs; GPU bundles obviously need a GPU node.
    if role in ("env_runner", "eval_env_runner") and not bundle.get("GPU") and node["gpu"]:
        return False
    return True


def _place(bundles: list[tuple[str, dict]], pool: list[dict]) -> tuple[int | None, list]:
    """First-fit placement preferring nodes already in use. Returns the index of the
    first bundle that fails (None if all fit) and the placements made."""

    # Most constrained first: GPU bundles, then bundles asking for custom resources
    # (e.g. "learner"), then the main process, then env runners.
    def constraint(i: int) -> tuple:
        role, bundle = bundles[i]
        custom = sum(1 for k, v in bundle.items() if v and k not in ("CPU", "GPU"))
        return (-float(bundle.get("GPU", 0)), -custom, role != "main_process")

    order = sorted(range(len(bundles)), key=constraint)
    placements = []
    for i in order:
        role, bundle = bundles[i]
        candidates = sorted(
            (n for n in pool if _allowed(role, bundle, n)),
            key=lambda n: (not n["used"], not n["head"], n["type"], n["index"]),
        )
        for node in candidates:
            if _fits(bundle, node["free"]):
                for k, v in bundle.items():
                    node["free"][k] = node["free"].get(k, 0.0) - float(v)
                node["used"] = True
                placements.append((role, bundle, node["type"], node["index"]))
                break
        else:
            return i, placements
    return None, placements


def _fmt(bundle: dict) -> str:
    items = [f"{v:g} {k}" for k, v in bundle.items() if v]
    return "{" + ", ".join(items) + "}" if items else "{nothing}"


def _failure_reason(role: str, bundle: dict, bundles: list, types: dict) -> str:
    same = [b for r, b in bundles if r == role]
    need = {k: sum(float(b.get(k, 0)) for b in same) for k in bundle if bundle[k]}
    allowed_types = {
        name: nt
        for name, nt in types.items()
        if _allowed(role, bundle, {"gpu": nt["resources"].get("GPU", 0) > 0})
    }
    offers = []
    for name, nt in allowed_types.items():
        count = 1 if nt["head"] else nt["max_workers"]
        per = {k: nt["resources"].get(k, 0) for k in need}
        per_node = min((math.floor(per[k] / float(bundle[k]) + 1e-9) for k in need), default=0)
        if per_node:
            offers.append(f"{name}: {count} node(s) x {_fmt(per)} -> {count * per_node}")
    total = sum(
        (1 if nt["head"] else nt["max_workers"])
        * min(
            (math.floor(nt["resources"].get(k, 0) / float(bundle[k]) + 1e-9) for k in need),
            default=0,
        )
        for nt in allowed_types.values()
    )
    policy = (
        " (CPU-only env runners are kept off GPU nodes)"
        if role in ("env_runner", "eval_env_runner") and not bundle.get("GPU")
        else ""
    )
    crowded = "; the trial's other bundles take the rest of that room" if total >= len(same) else ""
    return (
        f"does not fit: {len(same)} {role.replace('_', ' ')}(s) x {_fmt(bundle)} "
        f"(total {_fmt(need)}) but the node types at their maximum counts host at most "
        f"{total}{policy}: " + ("; ".join(offers) or "no node type has room") + crowded
    )


def fits_cluster(resources_request: dict, path: str | os.PathLike) -> tuple[bool, str]:
    """Can one trial with this RLlib resource request run on the cluster at its maxima?

    ``resources_request`` uses RLlib's config names, e.g. ``{"num_env_runners": 64,
    "num_cpus_per_env_runner": 1, "num_learners": 1, "num_gpus_per_learner": 1,
    "num_cpus_for_main_process": 1}`` (see :func:`trial_bundles` for all keys and
    defaults). Every worker node type is counted at ``max_workers`` (the head once),
    bundles are bin-packed per node (first fit, learners and the main process first,
    CPU-only env runners only on nodes without GPUs), and the number of worker nodes
    used must not exceed the config's global ``max_workers``. Returns
    ``(ok, reason)``; the reason gives the numbers either way.
    """
    types = node_types(path)
    bundles = trial_bundles(resources_request)
    pool = _node_pool(types)
    failed, placements = _place(bundles, pool)
    if failed is not None:
        role, bundle = bundles[failed]
        return False, _failure_reason(role, bundle, bundles, types)
    used_workers = [n for n in pool if n["used"] and not n["head"]]
    cap = _global_max_workers(path)
    if cap is not None and len(used_workers) > cap:
        return False, (
            f"does not fit: needs {len(used_workers)} worker nodes but the global "
            f"max_workers is {cap}"
        )
    per_type: dict[str, set[int]] = {}
    for _, _, t, i in placements:
        per_type.setdefault(t, set()).add(i)
    roles: dict[str, list] = {}
    for role, bundle, t, _ in placements:
        roles.setdefault(role, []).append((bundle, t))
    parts = []
    for role, items in roles.items():
        where = sorted({t for _, t in items})
        parts.append(
            f"{len(items)} {role.replace('_', ' ')}(s) x {_fmt(items[0][0])} on {'/'.join(where)}"
        )
    nodes = ", ".join(f"{len(ix)} {t}" for t, ix in sorted(per_type.items()))
    return True, f"fits: {'; '.join(parts)}; nodes used: {nodes}"


def max_concurrent_trials(resources_request: dict, path: str | os.PathLike) -> int:
    """How many trials with this request the cluster hosts at once at its maxima."""
    types = node_types(path)
    cap = _global_max_workers(path)
    bundles = trial_bundles(resources_request)
    pool = _node_pool(types)
    n = 0
    while True:
        trial_pool = copy.deepcopy(pool)
        failed, _ = _place(bundles, trial_pool)
        used = sum(1 for node in trial_pool if node["used"] and not node["head"])
        if failed is not None or (cap is not None and used > cap):
            return n
        pool, n = trial_pool, n + 1
        if n > 10_000:  # a request of nothing fits forever
            return n


# ------------------------------------------------------- tuned examples (Tune YAML)

# RLlib's deprecated spellings, mapped to the new-stack names.
_ALIASES = {
    "num_workers": "num_env_runners",
    "num_rollout_workers": "num_env_runners",
    "num_cpus_per_worker": "num_cpus_per_env_runner",
    "num_gpus_per_worker": "num_gpus_per_env_runner",
    "custom_resources_per_worker": "custom_resources_per_env_runner",
    "num_learner_workers": "num_learners",
    "num_cpus_per_learner_worker": "num_cpus_per_learner",
    "num_gpus_per_learner_worker": "num_gpus_per_learner",
    "num_cpus_for_local_worker": "num_cpus_for_main_process",
    "evaluation_num_workers": "evaluation_num_env_runners",
}
# AlgorithmConfig methods whose kwargs may appear as nested sections.
_SECTIONS = ("env_runners", "learners", "resources", "evaluation", "rollouts")


def tuned_example_files(root: str | os.PathLike) -> list[Path]:
    """Every ``*.yaml`` / ``*.yml`` file under ``root`` (recursive, sorted)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))


def _resolve_value(key: str, value: Any) -> Any:
    """A number, or the largest value of a Tune ``grid_search``."""
    if isinstance(value, dict) and "grid_search" in value:
        values = [_resolve_value(key, v) for v in value["grid_search"]]
        if all(isinstance(v, dict) for v in values):
            merged: dict = {}
            for v in values:
                for k, x in v.items():
                    merged[k] = max(merged.get(k, x), x)
            return merged
        return max(values)
    if key.startswith("custom_resources") and isinstance(value, dict):
        return value
    if key == "num_cpus_per_learner" and value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}: cannot size a cluster for {value!r}")
    return value


def _request_from_config(config: dict) -> dict:
    flat: dict[str, Any] = {}
    for section in _SECTIONS:
        nested = config.get(section)
        if isinstance(nested, dict):
            flat.update(nested)
    flat.update({k: v for k, v in config.items() if k not in _SECTIONS})
    request: dict[str, Any] = {}
    for key, value in flat.items():
        name = _ALIASES.get(key, key)
        if name in _REQUEST_DEFAULTS:
            request[name] = _resolve_value(name, value)
    return request


def experiment_resource_requests(path: str | os.PathLike) -> dict[str, dict]:
    """Per experiment in a Tune YAML file, the resource request of one trial.

    The file maps experiment names to ``{run/algo, env, config, stop, ...}``; a file
    that is itself one experiment (top-level ``config``) is read as such. Flat keys
    and the nested ``env_runners:``/``learners:``/``resources:``/``evaluation:``
    sections are understood, as are RLlib's deprecated names and ``grid_search``
    (its largest value counts).
    """
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a Tune experiment file must be a mapping")
    if "config" in data and isinstance(data["config"], dict):
        experiments: Iterable = [(Path(path).stem, data)]
    else:
        experiments = data.items()
    out = {}
    for name, exp in experiments:
        if not isinstance(exp, dict) or not isinstance(exp.get("config", {}), dict):
            raise ValueError(f"{path}: experiment {name!r} has no `config` mapping")
        try:
            out[str(name)] = _request_from_config(exp.get("config") or {})
        except ValueError as e:
            raise ValueError(f"{path}: experiment {name!r}: {e}") from e
    if not out:
        raise ValueError(f"{path}: no experiments found")
    return out


# --------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> int:
    """Validates cluster definitions; with ``--request``, checks that a trial fits each.

    Returns 0 when every file is valid (and the request fits every cluster), else 1.
    """
    parser = argparse.ArgumentParser(
        prog="python cluster/check.py",
        description="Validate cluster definitions offline (Ray's autoscaler schema and "
        "validate_config for `ray up` configs, the fields KubeRay needs for a RayCluster).",
    )
    parser.add_argument(
        "files", nargs="*", help=f"cluster YAML files (default: every *.yaml in {HERE})"
    )
    parser.add_argument(
        "--request",
        default=None,
        help="an RLlib resource request as JSON, e.g. "
        '\'{"num_env_runners": 64, "num_gpus_per_learner": 1}\': also print '
        "whether one trial fits and how many run at once",
    )
    args = parser.parse_args(argv)
    try:
        request = json.loads(args.request) if args.request else None
    except json.JSONDecodeError as err:
        parser.error(f"--request is not valid JSON: {err}")
    if request is not None and not isinstance(request, dict):
        parser.error("--request must be a JSON object")
    files = [Path(f) for f in args.files]
    files = files or [Path(os.path.relpath(f)) for f in sorted(HERE.glob("*.yaml"))]
    status = 0
    for path in files:
        try:
            kind = config_kind(path)
            if kind == "kuberay":
                validate_kuberay_manifest(path)
            else:
                validate_autoscaler_config(path)
        except (OSError, ValueError) as err:
            print(f"{path}: invalid: {err}")
            status = 1
            continue
        print(f"{path}: valid {kind} config")
        if request is not None:
            ok, reason = fits_cluster(request, path)
            print(f"  {reason}")
            if ok:
                print(f"  concurrent trials at most: {max_concurrent_trials(request, path)}")
            status = max(status, 0 if ok else 1)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
