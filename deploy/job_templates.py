"""The GPU work pools' base job templates, made from the workers' own defaults.

    python deploy/job_templates.py           # (re)write deploy/*-gpu-job-template.json
    python deploy/job_templates.py --check   # exit 1 if a file differs from what is made here

Each template is the worker's default (``prefect work-pool get-default-base-job-template
--type kubernetes|docker``, the worker class's ``get_default_base_job_template()``) with the
variables a training run needs added. Kubernetes: ``gpu_count`` (the container's
``nvidia.com/gpu`` limit), ``memory_request``/``memory_limit`` and ``cpu_request``/``cpu_limit``
(defaults given), ``node_selector`` and ``tolerations`` (the pod's, defaults for NVIDIA's GPU
nodes) and ``env_from`` (secrets or config maps, e.g. object-storage credentials). Docker:
``gpu_count`` (a device request to the NVIDIA runtime), ``mem_limit`` and ``shm_size``. Both:
``mlflow_tracking_uri``, ``dvc_remote``, ``result_storage_block`` and ``persist_results``,
passed to the run as environment variables (unset: not passed), and ``MILORA_GPUS`` =
``gpu_count`` for the flow's GPU concurrency limit (tasks/cluster.py). Create the pools with

    prefect work-pool create milora-k8s --type kubernetes --base-job-template deploy/k8s-gpu-job-template.json
    prefect work-pool create milora-docker --type docker --base-job-template deploy/docker-gpu-job-template.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
K8S_TEMPLATE = HERE / "k8s-gpu-job-template.json"
DOCKER_TEMPLATE = HERE / "docker-gpu-job-template.json"

GPU_RESOURCE = "nvidia.com/gpu"
# The label NVIDIA's GPU feature discovery puts on GPU nodes, and the taint GPU node pools
# commonly carry (GKE, AKS, the GPU operator's docs): overridable per pool or deployment.
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]


def _string(title: str, description: str, default: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"title": title, "type": "string", "description": description}
    if default is not None:
        spec["default"] = default
    return spec


GPU_COUNT = {
    "title": "GPUs",
    "type": "integer",
    "minimum": 1,
    "default": 1,
    "description": "GPUs of the run's container; also the slots it holds of the Prefect global "
    "concurrency limit milora-gpu (MILORA_GPUS, tasks/cluster.py).",
}
# Where a run keeps what outlives its container: an unset variable passes nothing.
STORAGE_VARIABLES = {
    "mlflow_tracking_uri": _string(
        "MLflow tracking URI",
        "MLFLOW_TRACKING_URI of the runs: an MLflow server reachable from the cluster, started with "
        "--artifacts-destination s3://BUCKET/PATH (adapters and reports go to object storage). "
        "Unset: params.yaml's registry.tracking_uri (a SQLite file inside the container, lost with it).",
    ),
    "dvc_remote": _string(
        "DVC remote",
        "URL of the DVC remote the run pulls unchanged outputs from and pushes new ones to, e.g. "
        "s3://BUCKET/dvc (MILORA_DVC_REMOTE; the image needs dvc-s3: EXTRA_PACKAGES). Unset: the "
        "project's own remote.",
    ),
    "result_storage_block": _string(
        "Result storage block",
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: a block slug such as s3-bucket/milora-results "
        "(prefect-aws in the image) where Prefect persists task and flow results.",
    ),
    "persist_results": {
        "title": "Persist results",
        "type": "boolean",
        "default": False,
        "description": "PREFECT_RESULTS_PERSIST_BY_DEFAULT: persist results (to result_storage_block).",
    },
}
STORAGE_ENV = {
    "MLFLOW_TRACKING_URI": "{{ mlflow_tracking_uri }}",
    "MILORA_DVC_REMOTE": "{{ dvc_remote }}",
    "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "{{ result_storage_block }}",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "{{ persist_results }}",
    "MILORA_GPUS": "{{ gpu_count }}",
}


def _job_env(template: dict[str, Any]) -> None:
    """The run's environment: these entries, then the deployment's and the flow run's ``env``
    (Prefect merges those over a template's ``env`` when it is a mapping)."""
    assert template["job_configuration"]["env"] == "{{ env }}", template["job_configuration"]["env"]
    template["job_configuration"]["env"] = dict(STORAGE_ENV)


def kubernetes_template() -> dict[str, Any]:
    from prefect_kubernetes.worker import KubernetesWorker

    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    properties = template["variables"]["properties"]
    properties["gpu_count"] = GPU_COUNT
    properties["node_selector"] = {
        "title": "Node selector",
        "type": "object",
        "additionalProperties": {"type": "string"},
        "default": GPU_NODE_SELECTOR,
        "description": "nodeSelector of the pod: labels of the nodes it may run on.",
    }
    properties["tolerations"] = {
        "title": "Tolerations",
        "type": "array",
        "items": {"type": "object"},
        "default": GPU_TOLERATIONS,
        "description": "tolerations of the pod: taints of GPU nodes it may run on.",
    }
    properties["env_from"] = {
        "title": "Environment from",
        "type": "array",
        "items": {"type": "object"},
        "default": [],
        "description": "envFrom of the container, e.g. [{secretRef: {name: milora-storage}}] with "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (object storage) or MLFLOW_TRACKING_TOKEN.",
    }
    for name, default in (
        ("cpu_request", "4"),
        ("cpu_limit", "8"),
        ("memory_request", "32Gi"),
        ("memory_limit", "32Gi"),
    ):
        properties[name]["default"] = default
    properties.update(STORAGE_VARIABLES)
    _job_env(template)

    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    (container,) = pod["containers"]
    container["envFrom"] = "{{ env_from }}"
    container["resources"]["limits"][GPU_RESOURCE] = "{{ gpu_count }}"
    return template


def docker_template() -> dict[str, Any]:
    from prefect_docker.worker import DockerWorker

    template = copy.deepcopy(DockerWorker.get_default_base_job_template())
    properties = template["variables"]["properties"]
    properties["gpu_count"] = GPU_COUNT
    properties["shm_size"] = _string(
        "Shared memory", "Size of /dev/shm (Docker's 64m is too small for NCCL and data loaders).", "8g"
    )
    properties["mem_limit"]["default"] = "32g"
    properties.update(STORAGE_VARIABLES)
    _job_env(template)
    # docker-py's containers.create(device_requests=..., shm_size=...): the `--gpus N` of
    # `docker run`. These take the place of the default's free-form container_create_kwargs.
    del properties["container_create_kwargs"]
    template["job_configuration"]["container_create_kwargs"] = {
        "device_requests": [{"driver": "nvidia", "count": "{{ gpu_count }}", "capabilities": [["gpu"]]}],
        "shm_size": "{{ shm_size }}",
    }
    return template


def render(template: dict[str, Any]) -> str:
    return json.dumps(template, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for path, make in ((K8S_TEMPLATE, kubernetes_template), (DOCKER_TEMPLATE, docker_template)):
        text = render(make())
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (python deploy/job_templates.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
