"""The GPU cluster setup, without a cluster: the image definition read for its key facts, the
work pools' job templates checked against the workers' own defaults, and on a real Prefect
server (started here, stopped by PID) the Kubernetes and Docker pools created from those
templates, the deployments of deploy/prefect-cluster.yaml deployed, a flow run's job rendered
by each worker's own code, the pull step run (it clones the deployed commit), and the GPU
concurrency limit held by the flow's guard."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BIN, REPO, free_port, git, stop, wait_healthy

from milora.offline import OFFLINE_ENV

pytestmark = pytest.mark.slow

IMAGE = "registry.example/milora:test"


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuations joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for line in joined.splitlines()
        if (parts := line.strip().split(None, 1))
    ]


def load_job_templates():
    spec = importlib.util.spec_from_file_location("job_templates", REPO / "deploy" / "job_templates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_image_is_cuda_with_the_pinned_dependencies_as_a_user():
    steps = dockerfile_instructions((REPO / "Dockerfile").read_text())
    args = dict(arg.split("=", 1) for kind, arg in steps if kind == "ARG" and "=" in arg)
    first = next(i for i, (kind, _) in enumerate(steps) if kind == "FROM")
    assert steps[first][1] == "${BASE_IMAGE}"
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", args["BASE_IMAGE"])
    runs = [arg for kind, arg in steps if kind == "RUN"]
    torch_first = next(i for i, run in enumerate(runs) if 'pip install "torch==${TORCH_VERSION}"' in run)
    project = next(i for i, run in enumerate(runs) if "pip install -c constraints.txt -e" in run)
    assert torch_first < project and '".[pipeline,cluster]"' in runs[project]
    makefile = (REPO / "Makefile").read_text()
    assert f"TORCH_VERSION ?= {args['TORCH_VERSION']}\n" in makefile  # the Makefile's torch
    env = " ".join(arg for kind, arg in steps if kind == "ENV")
    for key, value in OFFLINE_ENV.items():  # telemetry off, hub offline, as everywhere
        assert re.search(rf"(^|\s){key}={re.escape(value)}(\s|$)", env), key
    user = [arg for kind, arg in steps if kind == "USER"]
    assert user and user[-1] not in ("root", "0")
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "outputs", "mlflow.db"} <= set(ignored)


def test_job_templates_are_the_workers_defaults_with_the_gpu_variables():
    from prefect_docker.worker import DockerWorker
    from prefect_kubernetes.worker import KubernetesWorker

    module = load_job_templates()
    assert module.main(["--check"]) == 0, "python deploy/job_templates.py: a template file is stale"
    for worker, path, dropped in (
        (KubernetesWorker, module.K8S_TEMPLATE, set()),
        (DockerWorker, module.DOCKER_TEMPLATE, {"container_create_kwargs"}),
    ):
        default = worker.get_default_base_job_template()["variables"]["properties"]
        ours = json.loads(path.read_text())["variables"]["properties"]
        assert set(default) - dropped <= set(ours) and "gpu_count" in ours, path.name


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("cluster-server")
    env = {**os.environ, **OFFLINE_ENV, "PREFECT_HOME": str(home / "prefect")}
    for name in ("PREFECT_API_URL", "MILORA_GIT_REF", "MILORA_DVC_REMOTE", "MILORA_GPU_LIMIT"):
        env.pop(name, None)
    port = free_port()
    with open(home / "prefect.log", "w") as log:
        process = subprocess.Popen(
            [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_healthy(f"http://127.0.0.1:{port}/api/health", process)
            yield {
                **env,
                "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            }
        finally:
            stop(process)


def sandbox(root: Path) -> tuple[Path, str]:
    """A git repository with the flow's code and the cluster deployments; its commit."""
    for name in ("flows", "tasks", "milora", "deploy"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "code")
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    return root, done.stdout.strip()


def cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


async def render_jobs(api: str, project: Path, commit: str, workdir: Path) -> dict:
    """The deployments as the server holds them, each pool's job for a flow run (prepared by
    the worker's own job configuration class), and the clone the pull steps make."""
    from prefect.client.orchestration import PrefectClient
    from prefect.deployments.steps.core import run_steps
    from prefect_docker.worker import DockerWorkerJobConfiguration
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    out: dict = {}
    async with PrefectClient(api) as client:
        for name in ("retrain-k8s", "retrain-full-k8s", "retrain-docker", "retrain-full-docker"):
            out[name] = await client.read_deployment_by_name(f"retrain/{name}")
        for name, configuration, overrides in (
            ("retrain-k8s", KubernetesWorkerJobConfiguration, {"gpu_count": 2}),
            ("retrain-docker", DockerWorkerJobConfiguration, {}),
        ):
            deployment = out[name]
            flow_run = await client.create_flow_run_from_deployment(
                deployment.id, job_variables={**overrides, "mlflow_tracking_uri": "http://mlflow:5000"}
            )
            pool = await client.read_work_pool(deployment.work_pool_name)
            out[f"{name} job"] = await configuration.resolve_for_flow_run(
                flow_run, client=client, work_pool=pool, worker_name="test", deployment=deployment
            )
    os.chdir(workdir)  # the pull steps clone here and step into the clone
    out["pulled"] = await run_steps(out["retrain-k8s"].pull_steps)
    return out


def test_cluster_deployments_render_gpu_jobs_and_clone_their_commit(server, tmp_path, monkeypatch):
    project, commit = sandbox(tmp_path / "project")
    env = {**server, "MILORA_IMAGE": IMAGE, "MILORA_GIT_REPOSITORY": str(project), "COLUMNS": "250"}
    cli(env, project, "work-pool", "create", "milora-k8s", "--type", "kubernetes",
        "--base-job-template", "deploy/k8s-gpu-job-template.json")  # fmt: skip
    cli(env, project, "work-pool", "create", "milora-docker", "--type", "docker",
        "--base-job-template", "deploy/docker-gpu-job-template.json")  # fmt: skip
    cli(env, project, "--no-prompt", "deploy", "--prefect-file", "deploy/prefect-cluster.yaml", "--all")

    monkeypatch.delenv("MILORA_DVC_REMOTE", raising=False)
    monkeypatch.chdir(tmp_path)  # restored after the pull steps' chdir
    (tmp_path / "worker").mkdir()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):  # no temporary server
        found = asyncio.run(render_jobs(server["PREFECT_API_URL"], project, commit, tmp_path / "worker"))

    k8s, docker = found["retrain-k8s"], found["retrain-docker"]
    assert (k8s.work_pool_name, docker.work_pool_name) == ("milora-k8s", "milora-docker")
    assert k8s.job_variables["image"] == docker.job_variables["image"] == IMAGE
    assert k8s.job_variables["gpu_count"] == 1 and k8s.job_variables["memory_limit"] == "32Gi"
    assert k8s.job_variables["node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert k8s.job_variables["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert docker.job_variables["gpu_count"] == 1 and docker.job_variables["mem_limit"] == "32g"
    assert found["retrain-full-k8s"].parameters["start"] == "base"
    assert k8s.global_concurrency_limit.limit == 1
    assert k8s.concurrency_options.collision_strategy == "CANCEL_NEW"
    # The pull step clones the commit that was deployed, from the repository given.
    clone = k8s.pull_steps[0]["prefect.deployments.steps.git_clone"]
    assert (clone["repository"], clone["commit_sha"]) == (str(project), commit)
    cloned = Path(found["pulled"]["directory"]).resolve()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cloned, capture_output=True, text=True)
    assert head.stdout.strip() == commit and (cloned / "flows" / "retrain.py").is_file()
    assert cloned.parent == (tmp_path / "worker").resolve()

    # Kubernetes: the Job the worker would submit (a flow run asking for 2 GPUs).
    manifest = found["retrain-k8s job"].job_manifest
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 2, "memory": "32Gi", "cpu": "8"}
    assert container["resources"]["requests"] == {"memory": "32Gi", "cpu": "4"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert container["envFrom"] == []
    job_env = {item["name"]: item.get("value") for item in container["env"]}
    assert job_env["MILORA_GPUS"] == "2" and job_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "MILORA_DVC_REMOTE" not in job_env  # unset pool variables pass nothing
    assert job_env["PREFECT__FLOW_RUN_ID"] and container["args"][:3] == ["prefect", "flow-run", "execute"]

    # Docker: the container's device request, as docker-py sends it (`docker run --gpus 1`).
    import docker.types

    job = found["retrain-docker job"]
    assert job.image == IMAGE and job.mem_limit == "32g"
    assert job.env["MILORA_GPUS"] == "1" and job.env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    host = docker.types.HostConfig(version="1.44", **job.container_create_kwargs)
    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": 1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert host["ShmSize"] == 8 * 1024**3


GUARD = """
import json, os
from prefect.client.orchestration import get_client
from tasks.cluster import gpu_slots
def active():
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name("milora-gpu").active_slots
found = {}
os.environ["MILORA_GPU_LIMIT"] = "no-such-limit"  # a server without the limit: nothing held
with gpu_slots() as held:
    found["without"] = held
del os.environ["MILORA_GPU_LIMIT"]
os.environ["MILORA_GPUS"] = "2"
with gpu_slots() as held:
    found["held"], found["inside"] = held, active()
found["after"] = active()
os.environ["MILORA_GPUS"] = "3"
try:
    with gpu_slots():
        pass
except ValueError as error:
    found["too_many"] = str(error)
print(json.dumps(found))
"""


def test_the_flow_guard_holds_a_slot_per_gpu_of_the_limit(server, tmp_path):
    cli(server, tmp_path, "gcl", "create", "milora-gpu", "--limit", "2")
    done = subprocess.run(
        [sys.executable, "-c", GUARD], cwd=REPO, env=server, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert (found["without"], found["held"], found["inside"], found["after"]) == (0, 2, 2, 0)
    assert "takes 3 GPUs" in found["too_many"] and "has 2 slots" in found["too_many"]
