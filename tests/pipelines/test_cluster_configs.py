"""The cluster configs in ``cluster/`` are accepted by Ray's own readers and are valid Kubernetes pod specs."""

from __future__ import annotations

import copy
import pathlib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"


def test_the_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(config))  # defaults filled as `ray up` does, then ray/autoscaler/ray-schema.json
    types = config["available_node_types"]
    assert types["gpu_worker"]["resources"]["GPU"] == 1 and types["head"]["resources"]["CPU"] == 0
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_wokers"] = 0  # a typo must not pass
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(broken))


def ray_clusters():
    rc = yaml.safe_load((CLUSTER / "kuberay/raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay/rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("python -m pipelines run s3://")
    job_cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": dict(job["metadata"]),
                   "spec": job["spec"]["rayClusterSpec"]}
    for cr in (rc, job_cluster):  # kubectl fills the namespace in from the context
        cr["metadata"].setdefault("namespace", "default")
    return [rc, job_cluster]


@pytest.mark.parametrize("which", [0, 1], ids=["RayCluster", "RayJob.rayClusterSpec"])
def test_kuberay_specs_are_read_by_rays_kuberay_autoscaler(which):
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    config = _derive_autoscaling_config_from_ray_cr(ray_clusters()[which])
    types = config["available_node_types"]
    assert types["gpu"]["resources"]["GPU"] == 1 and types["gpu"]["resources"]["CPU"] == 8
    assert types["cpu"]["resources"]["CPU"] == 16 and types["cpu"]["max_workers"] == 32
    assert types["headgroup"]["resources"]["CPU"] == 0  # drivers only


@pytest.mark.parametrize("which", [0, 1], ids=["RayCluster", "RayJob.rayClusterSpec"])
def test_kuberay_pod_templates_are_valid_kubernetes_pod_specs(which):
    import kubernetes_validate

    spec = ray_clusters()[which]["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
           "spec": {"containers": [{"name": "x", "image": "y", "resource": {}}]}}
    with pytest.raises(Exception):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_the_runtime_env_file_is_a_mapping_without_secrets():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(env) <= {"py_modules", "pip", "env_vars", "working_dir", "excludes"}
    secret = ("KEY", "SECRET", "PASSWORD", "AUTH_TOKEN", "SESSION_TOKEN")
    assert not any(k.upper().endswith(secret) for k in env.get("env_vars", {}))


def test_the_runtime_env_ships_the_wheel_of_this_version():
    import gradmimic

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["py_modules"] == [f"dist/gradmimic-{gradmimic.__version__}-py3-none-any.whl"]
