"""The Kubernetes path without a cluster: every step's Job manifest rendered by dagster-k8s's own
``K8sStepHandler`` and validated with the ``kubernetes`` client's models, the profile's refusals,
the Helm values and manifests in deploy/, the Dockerfile, and the extras' install dry run.

How a step pod is made in the cluster, reproduced here: the run pod (K8sRunLauncher, as the Helm
chart configures it) builds the job's executor from the profile (``defs/kubernetes.py``); for each
step, dagster-k8s merges the run launcher's and the code location's config (the chart's
``includeConfigInLaunchedRuns`` container context), the executor's and the step's
``per_step_k8s_config``, and constructs the Job it would create. Only the API call is replaced.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("dagster_k8s")

import dagster as dg  # noqa: E402
import dagster_k8s.executor  # noqa: E402
import kubernetes  # noqa: E402
from dagster._core.code_pointer import ModuleCodePointer  # noqa: E402
from dagster._core.definitions.job_base import InMemoryJob  # noqa: E402
from dagster._core.execution.api import create_execution_plan  # noqa: E402
from dagster._core.execution.retries import RetryMode  # noqa: E402
from dagster._core.executor.init import InitExecutorContext  # noqa: E402
from dagster._core.executor.step_delegating import StepHandlerContext  # noqa: E402
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin  # noqa: E402
from dagster._core.storage.dagster_run import DagsterRun  # noqa: E402
from dagster._core.system_config.objects import ResolvedRunConfig  # noqa: E402
from dagster._core.utils import make_new_run_id  # noqa: E402
from dagster._grpc.types import ExecuteStepArgs  # noqa: E402
from dagster_k8s import K8sRunLauncher  # noqa: E402

from attribution_assets.defs.factory import build_definitions  # noqa: E402
from attribution_assets.defs.kubernetes import PIPELINES_DIR, PIPELINES_PATH, PIPELINES_VOLUME  # noqa: E402
from attribution_assets.defs.profiles import ProfileError, load_profile, profile_from_mapping  # noqa: E402
from attribution_assets.spec import (  # noqa: E402
    PIPELINES_ENV,
    FinetuneSpec,
    GradientSpec,
    MagicSpec,
    ScoringSpec,
    demo_spec,
    load_pipeline_file,
)

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "resources" / "kubernetes.yaml"
DEPLOY = ROOT / "deploy"
RELEASE, NAMESPACE = "dagster", "attribution"  # `helm install dagster ... -n attribution`
DAGSTER_HOME = "/opt/dagster/dagster_home"  # the chart's dagsterHome
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
#: Assets whose steps must get a GPU (the `gpu` pool) and some that must not, by name.
GPU_ASSETS = {"train_gradients", "query_gradients", "kfac_covariance", "ekfac_correction", "kfac_query_gradients",
              "scores", "faiss_index", "finetune", "magic_training", "magic_scores", "lds_retrain"}
CPU_ASSETS = {"corpus", "tokenized_shards", "tokenized_queries", "shard_autocorr", "autocorrelation",
              "preconditioner", "kfac_factors", "ekfac_eigenvalues", "attribution_db"}


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def values():
    return _yaml(DEPLOY / "dagster-values.yaml")


@pytest.fixture(scope="module")
def profile():
    return load_profile(str(PROFILE))


@pytest.fixture(scope="module")
def user_specs(tmp_path_factory):
    """The pipelines of deploy/pipelines-configmap.yaml, loaded as a step pod loads its mount."""
    config_map = _yaml(DEPLOY / "pipelines-configmap.yaml")
    mount = tmp_path_factory.mktemp("pipelines") / "pipelines.yaml"
    mount.write_text(config_map["data"]["pipelines.yaml"])
    return load_pipeline_file(mount)


@pytest.fixture(scope="module")
def cluster_defs(profile, user_specs):
    """The code location a cluster serves: the demo, the ConfigMap's pipelines, and pipelines that
    use every GPU method (EK-FAC with streaming scores, MAGIC, fine-tuning)."""
    curvature = dataclasses.replace(demo_spec(gradients=GradientSpec(projection_dim=0, normalizer="none"),
                                              scoring=ScoringSpec(top_k=0, preconditioner="ekfac", mode="streaming"),
                                              magic=MagicSpec(enabled=True)), name="curvature")
    tuned = dataclasses.replace(demo_spec(), name="tuned", finetune=FinetuneSpec(epochs=1))
    return build_definitions([demo_spec(), *user_specs, curvature, tuned], profile)


# ---- the cluster's side, as the Helm chart with deploy/dagster-values.yaml sets it up ----------


def chart_container_context(values: dict) -> dict:
    """The code location's container context that the chart hands to launched runs
    (``includeConfigInLaunchedRuns``; its ``dagsterUserDeployments.k8sContainerContext`` template)."""
    deployment = values["dagster-user-deployments"]["deployments"][0]
    k8s = {"image_pull_policy": deployment["image"]["pullPolicy"], "namespace": NAMESPACE,
           "service_account_name": f"{RELEASE}-dagster-user-deployments-user-deployments",
           "env_config_maps": [f"{RELEASE}-dagster-user-deployments-{deployment['name']}-user-env",
                               *(c["name"] for c in deployment.get("envConfigMaps") or [])]}
    if deployment.get("envSecrets"):
        k8s["env_secrets"] = [s["name"] for s in deployment["envSecrets"]]
    for key, name in (("volumeMounts", "volume_mounts"), ("volumes", "volumes"), ("labels", "labels"),
                      ("resources", "resources"), ("env", "env")):
        if deployment.get(key):
            k8s[name] = deployment[key]
    return {"k8s": k8s}


def chart_run_launcher(values: dict) -> K8sRunLauncher:
    """The instance's K8sRunLauncher as the chart configures it (its dagster.yaml template)."""
    config = values["runLauncher"]["config"]["k8sRunLauncher"]
    return K8sRunLauncher(
        service_account_name=RELEASE, instance_config_map=f"{RELEASE}-instance",
        postgres_password_secret=values["global"]["postgresqlSecretName"], dagster_home=DAGSTER_HOME,
        job_namespace=config.get("jobNamespace") or NAMESPACE, image_pull_policy=config["imagePullPolicy"],
        load_incluster_config=config["loadInclusterConfig"],
        env_config_maps=[f"{RELEASE}-pipeline-env", *(c["name"] for c in config.get("envConfigMaps") or [])],
        env_secrets=[s["name"] for s in config.get("envSecrets") or []], env_vars=config.get("envVars") or [],
        volume_mounts=config.get("volumeMounts") or [], volumes=config.get("volumes") or [],
        resources=config.get("resources"))


class _CapturingClient:
    """Stands in for dagster-k8s's API client: keeps the Job instead of creating it."""

    def __init__(self):
        self.created: list[tuple[str, kubernetes.client.V1Job]] = []

    def create_namespaced_job_with_retries(self, body, namespace):
        self.created.append((namespace, body))


class _NoEvents:
    """The step-starting event needs a live step context; its content is not under test."""

    @staticmethod
    def step_worker_starting(*_args, **_kwargs):
        return None


@pytest.fixture(scope="module")
def offline_kubernetes():
    """No cluster: loading the in-cluster config is skipped, nothing else of dagster-k8s is."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kubernetes.config, "load_incluster_config", lambda *args, **kwargs: None)
        patch.setattr(dagster_k8s.executor, "DagsterEvent", _NoEvents)
        yield


def render_job_steps(job: dg.JobDefinition, values: dict, image: str) -> dict[str, tuple[str, dict]]:
    """Every step of ``job`` as the Job manifest dagster-k8s would create: step key -> (namespace,
    the manifest as the API receives it)."""
    instance = dg.DagsterInstance.ephemeral()
    executor_config = ResolvedRunConfig.build(job, {}).execution.execution_engine_config
    executor = job.executor_def.executor_creation_fn(
        InitExecutorContext(job=InMemoryJob(job), executor_def=job.executor_def,
                            executor_config=executor_config, instance=instance))
    handler = executor._step_handler
    client = handler._api_client = _CapturingClient()
    origin = JobPythonOrigin(job.name, RepositoryPythonOrigin(
        executable_path="/usr/local/bin/python",
        code_pointer=ModuleCodePointer("attribution_assets.definitions", "defs", working_directory=None),
        container_image=image, entry_point=["dagster"], container_context=chart_container_context(values)))
    run = DagsterRun(job_name=job.name, run_id=make_new_run_id(), job_code_origin=origin)
    cluster = SimpleNamespace(run_launcher=chart_run_launcher(values))
    plan_context = SimpleNamespace(for_step=lambda step: SimpleNamespace(step=step))
    manifests = {}
    for step in create_execution_plan(job).get_all_steps_in_topo_order():
        args = ExecuteStepArgs(job_origin=origin, run_id=run.run_id, step_keys_to_execute=[step.key],
                               retry_mode=RetryMode.DISABLED, should_verify_step=True)
        context = StepHandlerContext(instance=cluster, plan_context=plan_context, steps=[step],
                                     execute_step_args=args, dagster_run=run)
        list(handler.launch_step(context))
        namespace, body = client.created.pop()
        manifests[step.key] = (namespace, kubernetes.client.ApiClient().sanitize_for_serialization(body))
    return manifests


def validate_manifest(manifest: dict) -> kubernetes.client.V1Job:
    """The manifest through the kubernetes client's models (what the API returns is deserialized
    the same way) and back, unchanged; plus the checks of the API server the models leave out."""
    api = kubernetes.client.ApiClient()
    job = api.deserialize(SimpleNamespace(data=json.dumps(manifest)), "V1Job")
    assert isinstance(job, kubernetes.client.V1Job)
    assert api.sanitize_for_serialization(job) == manifest
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    assert DNS_LABEL.fullmatch(manifest["metadata"]["name"]) and len(manifest["metadata"]["name"]) <= 63
    pod = manifest["spec"]["template"]["spec"]
    volumes = [v["name"] for v in pod.get("volumes", [])]
    assert len(volumes) == len(set(volumes)), f"duplicate volumes {volumes}"
    (container,) = pod["containers"]
    mounts = container.get("volumeMounts", [])
    assert {m["name"] for m in mounts} <= set(volumes), "a mount without its volume"
    assert len({m["mountPath"] for m in mounts}) == len(mounts), f"duplicate mount paths {mounts}"
    env = [e["name"] for e in container.get("env", [])]
    assert len(env) == len(set(env)), f"duplicate env {env}"
    return job


def test_every_step_manifest_is_a_valid_job(offline_kubernetes, cluster_defs, profile, values, user_specs):
    image = profile.k8s["job_image"]
    pools = profile.pool_k8s_config
    repository = cluster_defs.get_repository_def()
    jobs = [j for j in repository.get_all_jobs() if not j.name.startswith("__anonymous")]
    stage_jobs = {f"{s.name}_{stage}" for s in user_specs for stage in ("prepare", "shards", "fan_in", "scores",
                                                                         "database")}
    assert stage_jobs <= {j.name for j in jobs}
    seen: dict[str, set[str]] = {"gpu": set(), "default": set()}
    steps = 0
    for job in jobs:
        assert job.executor_def.name == "k8s"
        op_pools = {h.name: job.get_node(h).definition.pool for h in job.graph.iterate_node_handles()}
        for step_key, (namespace, manifest) in render_job_steps(job, values, image).items():
            steps += 1
            validate_manifest(manifest)
            pool = "gpu" if op_pools[step_key] == "gpu" else "default"
            seen[pool].add(step_key.split("__", 1)[1])
            pod = manifest["spec"]["template"]["spec"]
            (container,) = pod["containers"]
            assert namespace == NAMESPACE
            assert container["image"] == image and container["imagePullPolicy"] == "IfNotPresent"
            assert container["args"][:3] == ["dagster", "api", "execute_step"]
            # exactly the pool's resources: a GPU only on GPU steps, whatever the run launcher set
            assert container["resources"] == pools[pool]["container_config"]["resources"], step_key
            assert ("nvidia.com/gpu" in container["resources"]["requests"]) == (pool == "gpu")
            assert bool(pod.get("tolerations")) == (pool == "gpu")
            env = {e["name"]: e for e in container["env"]}
            assert env[PIPELINES_ENV]["value"] == PIPELINES_PATH
            assert env["DAGSTER_HOME"]["value"] == DAGSTER_HOME
            assert env["DAGSTER_PG_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
                "name": values["global"]["postgresqlSecretName"], "key": "postgresql-password"}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes[PIPELINES_VOLUME]["configMap"] == {"name": profile.pipelines_config_map}
            assert volumes["attribution-storage"]["persistentVolumeClaim"] == {"claimName": "attribution-storage"}
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            assert mounts[PIPELINES_VOLUME] == {"name": PIPELINES_VOLUME, "mountPath": PIPELINES_DIR,
                                                "readOnly": True}
            assert mounts["attribution-storage"]["mountPath"] == "/mnt/attribution"
    assert not GPU_ASSETS - seen["gpu"], GPU_ASSETS - seen["gpu"]
    assert not CPU_ASSETS - seen["default"], CPU_ASSETS - seen["default"]
    assert steps > 100


def test_a_profile_per_step_entry_is_laid_over_its_pool(offline_kubernetes, profile, values):
    """An op's ``executor.k8s.per_step_k8s_config`` entry wins over its pool's, and resources that
    the run launcher or the code location set never leak into a step (a CPU limit of 1 would make
    a 4-CPU GPU pod invalid)."""
    values = copy.deepcopy(values)
    values["runLauncher"]["config"]["k8sRunLauncher"]["resources"]["limits"]["cpu"] = "1"
    values["dagster-user-deployments"]["deployments"][0]["resources"] = {"limits": {"cpu": "1", "memory": "1Gi"}}
    raw = _yaml(PROFILE)
    raw["executor"]["k8s"]["per_step_k8s_config"] = {
        "demo__train_gradients": {"container_config": {"resources": {"requests": {"cpu": "8", "memory": "64Gi",
                                                                                 "nvidia.com/gpu": "2"},
                                                                    "limits": {"nvidia.com/gpu": "2"}}}}}
    bigger = profile_from_mapping(raw, "test", "kubernetes")
    job = build_definitions([demo_spec()], bigger).resolve_job_def("demo_shards")
    manifests = render_job_steps(job, values, profile.k8s["job_image"])
    pod = manifests["demo__train_gradients"][1]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert pod["tolerations"] == profile.pool_k8s_config["gpu"]["pod_spec_config"]["tolerations"]
    other = manifests["demo__tokenized_shards"][1]["spec"]["template"]["spec"]["containers"][0]
    assert other["resources"] == profile.pool_k8s_config["default"]["container_config"]["resources"]
    for _, manifest in manifests.values():
        validate_manifest(manifest)


# ---- the profile's refusals ----------------------------------------------------------------------


def _mutated(change) -> dict:
    raw = copy.deepcopy(_yaml(PROFILE))
    change(raw["executor"])
    return raw


def _image(value):
    return lambda executor: executor["k8s"].__setitem__("job_image", value)


@pytest.mark.parametrize("image", ["registry.example.com/attribution-assets",
                                   "registry.example.com/attribution-assets:latest",
                                   "registry.example.com:5000/team/attribution-assets",
                                   "attribution-assets:latest", "attribution-assets@sha256:abc"])
def test_profile_refuses_an_unpinned_image(image):
    with pytest.raises(ProfileError) as error:
        profile_from_mapping(_mutated(_image(image)), "kubernetes.yaml", "kubernetes")
    message = str(error.value)
    assert "`executor.k8s.job_image`" in message and "pinned tag or a digest" in message, message
    assert "registry.example.com/attribution-assets:0.1.0" in message  # the fix, by example


@pytest.mark.parametrize("image", ["registry.example.com:5000/team/attribution-assets:0.1.0",
                                   "attribution-assets:2026.12.07-abc123",
                                   "attribution-assets@sha256:" + "0" * 64])
def test_profile_accepts_a_pinned_tag_or_digest(image):
    profile = profile_from_mapping(_mutated(_image(image)), "kubernetes.yaml", "kubernetes")
    assert profile.k8s["job_image"] == image


def test_profile_reads_the_image_from_the_environment(monkeypatch):
    raw = _mutated(_image({"env": "ATTRIBUTION_IMAGE"}))
    monkeypatch.delenv("ATTRIBUTION_IMAGE", raising=False)
    with pytest.raises(ProfileError, match=r"\$ATTRIBUTION_IMAGE, which is unset"):
        profile_from_mapping(raw, "kubernetes.yaml", "kubernetes")
    monkeypatch.setenv("ATTRIBUTION_IMAGE", "attribution-assets:latest")
    with pytest.raises(ProfileError, match="tag `latest`"):
        profile_from_mapping(raw, "kubernetes.yaml", "kubernetes")
    monkeypatch.setenv("ATTRIBUTION_IMAGE", "attribution-assets:0.1.0")
    assert profile_from_mapping(raw, "kubernetes.yaml", "kubernetes").k8s["job_image"] == {"env": "ATTRIBUTION_IMAGE"}


def _requests(pool, **values):
    return lambda executor: executor["pool_k8s_config"][pool]["container_config"]["resources"]["requests"].update(
        {k.replace("_", "."): v for k, v in values.items()})


@pytest.mark.parametrize("change, fragment", [
    (lambda e: e["k8s"].pop("job_image"), "names the image every step pod runs"),
    (lambda e: e["k8s"].__setitem__("image_pull_policy", "Sometimes"), "`executor.k8s.image_pull_policy`"),
    (lambda e: e["k8s"].__setitem__("job_namespce", "x"), "k8s_job_executor config"),
    (lambda e: e["k8s"].__setitem__("resources", {"requests": {"cpu": "1"}}), "move them there"),
    (lambda e: e["pool_k8s_config"].pop("default"), "`default` (every other step"),
    (_requests("default", nvidia_com_gpu="1"), "only the steps of the `gpu` pool get a GPU"),
    (_requests("gpu", memory="lots"), "not a Kubernetes quantity"),
    (lambda e: e["pool_k8s_config"]["gpu"]["container_config"]["resources"].pop("limits"),
     "Kubernetes only accepts with an equal limit"),
    (_requests("default", memory="16Gi"), "must be at most its limit"),
    (lambda e: e["pool_k8s_config"]["gpu"]["pod_spec_config"].__setitem__("tolerashuns", []), "tolerashuns"),
    (lambda e: e.__setitem__("pipelines_config_map", "User_Pipelines"), "not a ConfigMap name"),
    (lambda e: e["k8s"]["env_vars"].append(f"{PIPELINES_ENV}=/elsewhere.yaml"), "remove them from `executor.k8s`"),
])
def test_profile_refuses_what_a_cluster_would_reject(change, fragment):
    with pytest.raises(ProfileError) as error:
        profile_from_mapping(_mutated(change), "kubernetes.yaml", "kubernetes")
    assert fragment in str(error.value) and "kubernetes.yaml" in str(error.value), str(error.value)


def test_kubernetes_keys_need_the_k8s_kind():
    raw = {"executor": {"kind": "multiprocess", "pipelines_config_map": "attribution-pipelines"}}
    with pytest.raises(ProfileError, match="applies only with `kind: k8s`"):
        profile_from_mapping(raw, "x.yaml", "x")


# ---- deploy/ and the Dockerfile agree with the profile ----------------------------------------------


def test_helm_values_run_the_profiles_image_with_postgres_and_the_run_queue(values, profile):
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert f"{deployment['image']['repository']}:{deployment['image']['tag']}" == profile.k8s["job_image"]
    assert deployment["image"]["pullPolicy"] == "IfNotPresent" and "resources" not in deployment
    assert deployment["codeServerArgs"] == ["-m", "attribution_assets.definitions"]
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": True}
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env[PIPELINES_ENV] == PIPELINES_PATH
    volumes = {v["name"]: v for v in deployment["volumes"]}
    assert volumes[PIPELINES_VOLUME]["configMap"]["name"] == profile.pipelines_config_map
    for volume in volumes.values():  # valid Kubernetes objects
        kubernetes.client.ApiClient().deserialize(SimpleNamespace(data=json.dumps(volume)), "V1Volume")
    # Postgres: the password only in a Secret the user creates, never in the values
    assert values["generatePostgresqlPasswordSecret"] is False
    assert not values["postgresql"].get("postgresqlPassword")
    assert values["postgresql"]["existingSecret"] == values["global"]["postgresqlSecretName"]
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == "QueuedRunCoordinator"
    assert values["concurrency"]["enabled"] and values["concurrency"]["pools"]["granularity"] == "op"
    assert values["runLauncher"]["type"] == "K8sRunLauncher"


def test_deploy_manifests_are_valid_kubernetes_objects(profile, user_specs):
    api = kubernetes.client.ApiClient()
    config_map = _yaml(DEPLOY / "pipelines-configmap.yaml")
    model = api.deserialize(SimpleNamespace(data=json.dumps(config_map)), "V1ConfigMap")
    assert model.metadata.name == profile.pipelines_config_map and model.metadata.namespace == NAMESPACE
    assert [s.name for s in user_specs] == ["pythia"]
    claim = _yaml(DEPLOY / "storage-pvc.yaml")
    model = api.deserialize(SimpleNamespace(data=json.dumps(claim)), "V1PersistentVolumeClaim")
    assert model.spec.access_modes == ["ReadWriteMany"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in profile.k8s["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [model.metadata.name]
    assert profile.storage.root.startswith("/mnt/attribution/")


def test_dockerfile_installs_the_k8s_extra_from_the_constraints(values):
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert any("-c constraints.txt" in line and '".[k8s]"' in line for line in lines)
    assert "COPY resources ./resources" in text and not any(line.startswith("ENTRYPOINT") for line in lines)
    workdir = next(line.split()[1] for line in lines if line.startswith("WORKDIR"))
    profile_path = re.search(r"ATTRIBUTION_RESOURCES=(\S+)", text).group(1)
    assert (ROOT / Path(profile_path).relative_to(workdir)) == PROFILE
    assert re.search(r"DAGSTER_HOME=(\S+)", text).group(1) == DAGSTER_HOME
    assert ":latest" not in text


# ---- the extras resolve on the package index ------------------------------------------------------


def _index_reachable() -> str | None:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        with urllib.request.urlopen(f"{index}/dagster-k8s/", timeout=10):
            return None
    except OSError as exc:
        return f"the package index {index} is unreachable ({exc})"


def test_install_dry_run_resolves_the_cluster_extras(tmp_path):
    """``pip install --dry-run -c constraints.txt '.[k8s,ray,postgres]'`` resolves every pin from
    the index (the Dockerfile's install; nothing is installed). Takes about a minute."""
    reason = _index_reachable()
    if reason:
        pytest.skip(reason)
    for name in ("pyproject.toml", "constraints.txt", "README.md"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    (tmp_path / "attribution_assets").mkdir()
    (tmp_path / "attribution_assets" / "__init__.py").touch()  # metadata needs no code
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--report", str(report), "-c", "constraints.txt", ".[k8s,ray,postgres]"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for name in ("dagster", "dagster-k8s", "dagster-postgres", "dagster-ray", "ray", "kubernetes"):
        assert resolved[name] == pins[name], (name, resolved.get(name))
