"""The ``k8s`` deployment profile: every step a Kubernetes Job (dagster-k8s's ``k8s_job_executor``).

``executor.k8s`` is the executor's own config, passed on as is, with two rules: ``job_image`` is
required and pinned (a tag other than ``latest``, or a digest), so every step of a run runs the
same code; ``image_pull_policy`` defaults to ``IfNotPresent`` (a pinned tag never changes).

Two profile keys (only with ``kind: k8s``) add what a cluster needs:

- ``pipelines_config_map``: a ConfigMap holding the user's pipelines under the key
  ``pipelines.yaml``. Every step pod mounts it at :data:`PIPELINES_DIR` and gets
  ``$ATTRIBUTION_PIPELINES`` pointing at the file, so a cluster runs the user's pipelines, not only
  the demo (the code server and run pods mount it through the Helm values, ``deploy/``).
- ``pool_k8s_config``: per-step Kubernetes config by the Dagster pool of the step's asset, in
  dagster-k8s's ``step_k8s_config`` form. ``gpu``: the steps of assets in the ``gpu`` pool
  (gradients, curvature, streaming scores, FAISS, fine-tuning, MAGIC, LDS retrains); ``default``:
  every other step (tokenizing, merges, fan-ins, DuckDB), which must not request a GPU. Both are
  required and both name ``container_config.resources.requests``.

The pools come from the built definitions, not from a list here: when a run starts, the
executor reads the pool of every op of the run's job and hands dagster-k8s one
``per_step_k8s_config`` entry per op (an entry the profile's ``executor.k8s.per_step_k8s_config``
names for an op is laid over its pool's config). The entries merge ``SHALLOW``ly: their
``resources`` replace whatever the run launcher or code location set, so a step's pod requests
exactly its pool's resources.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from typing import Any

import dagster as dg

from attribution_assets.spec import PIPELINES_ENV

#: Profile keys this module adds to the ``executor`` section.
K8S_KEYS = ("pipelines_config_map", "pool_k8s_config")
#: Where step pods mount the pipelines ConfigMap, its key, and the volume's name.
PIPELINES_DIR = "/etc/attribution/pipelines"
PIPELINES_KEY = "pipelines.yaml"
PIPELINES_PATH = f"{PIPELINES_DIR}/{PIPELINES_KEY}"
PIPELINES_VOLUME = "attribution-pipelines"
#: ``pool_k8s_config`` keys every k8s profile sets: the ``gpu`` pool and every other step.
GPU_POOL, DEFAULT_POOL = "gpu", "default"
PULL_POLICIES = ("IfNotPresent", "Always", "Never")
IMAGE_EXAMPLE = "e.g. `registry.example.com/attribution-assets:0.1.0` or `...@sha256:<digest>`"

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+([+._-][a-z0-9]+)*:[0-9a-fA-F]{32,}")


class _Problem(ValueError):
    """A profile problem found here; ``profiles.py`` raises it as its ``ProfileError``."""


def image_problem(image: str) -> str | None:
    """Why ``image`` is not a pinned reference (None when it is): no tag, ``latest``, malformed."""
    if not image or any(c.isspace() for c in image):
        return "is empty or contains whitespace"
    name, at, digest = image.partition("@")
    if at:
        return None if name and _DIGEST.fullmatch(digest) else "has a malformed digest"
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        return "has no tag, so Kubernetes pulls `:latest`, whatever that is at the time"
    tag = last.rsplit(":", 1)[1]
    if tag == "latest":
        return "uses the tag `latest`, which moves: steps of one run could run different code"
    if not _TAG.fullmatch(tag):
        return f"has an invalid tag {tag!r}"
    return None


def _resolve_image(value: Any, where: str) -> str:
    """``executor.k8s.job_image`` (a string or ``{env: NAME}``) as the reference it names."""
    key = "`executor.k8s.job_image`"
    if value is None:
        raise _Problem(f"{where}: a `kind: k8s` profile names the image every step pod runs: set {key} "
                       f"to the tag you built and pushed, {IMAGE_EXAMPLE} (docs/kubernetes.md).")
    if isinstance(value, dict) and set(value) == {"env"}:
        variable = value["env"]
        image = os.environ.get(str(variable), "")
        if not image:
            raise _Problem(f"{where}: {key} reads the image from ${variable}, which is unset or empty; "
                           f"export it ({IMAGE_EXAMPLE}) or write the reference in the profile.")
        return image
    if not isinstance(value, str):
        raise _Problem(f"{where}: {key} must be an image reference string or `{{env: NAME}}`, got {value!r}.")
    return value


def _is_gpu(resource: str) -> bool:
    return "gpu" in resource.lower()


def _check_resources(resources: Any, label: str, where: str) -> dict:
    """A container's ``resources`` as Kubernetes' API server would check them: quantities parse,
    requests do not exceed limits, extended resources (``nvidia.com/gpu``) have equal limits."""
    from kubernetes.utils import parse_quantity

    if not isinstance(resources, dict) or not isinstance(resources.get("requests"), dict) or not resources["requests"]:
        raise _Problem(f"{where}: {label} needs `container_config.resources.requests` (at least cpu and "
                       "memory), e.g. `resources: {requests: {cpu: \"2\", memory: 8Gi}, limits: {memory: 8Gi}}`.")
    unknown = sorted(set(resources) - {"requests", "limits", "claims"})
    if unknown:
        raise _Problem(f"{where}: {label}: `resources` takes `requests` and `limits`, not {unknown}.")
    limits = resources.get("limits") or {}
    if not isinstance(limits, dict):
        raise _Problem(f"{where}: {label}: `resources.limits` must be a mapping, got {limits!r}.")
    parsed: dict[str, dict] = {}
    for part, values in (("requests", resources["requests"]), ("limits", limits)):
        parsed[part] = {}
        for name, quantity in values.items():
            try:
                parsed[part][name] = parse_quantity(quantity)
            except (ValueError, TypeError):
                raise _Problem(f"{where}: {label}: `resources.{part}.{name}` is {quantity!r}, not a Kubernetes "
                               "quantity (e.g. \"2\", 500m, 8Gi).") from None
    for name, request in parsed["requests"].items():
        extended = "/" in name and not name.startswith(("hugepages-", "kubernetes.io/"))
        if extended and name not in parsed["limits"]:
            raise _Problem(f"{where}: {label}: `resources.requests.{name}` is an extended resource, which "
                           f"Kubernetes only accepts with an equal limit: add `limits: {{{name}: "
                           f"{resources['requests'][name]!r}}}`.")
        if name in parsed["limits"] and (request != parsed["limits"][name] if extended
                                         else request > parsed["limits"][name]):
            relation = "equal" if extended else "at most"
            raise _Problem(f"{where}: {label}: `resources.requests.{name}` must be {relation} its limit "
                           f"({resources['requests'][name]!r} > {limits[name]!r}).")
    return resources


def _check_pool_config(pool: str, value: Any, where: str) -> None:
    label = f"`executor.pool_k8s_config.{pool}`"
    if not isinstance(value, dict):
        raise _Problem(f"{where}: {label} must be a mapping in dagster-k8s's step_k8s_config form "
                       f"(`container_config`, `pod_spec_config`, ...), got {value!r}.")
    try:
        from dagster._config import validate_config
        from dagster_k8s.job import USER_DEFINED_K8S_JOB_CONFIG_SCHEMA, UserDefinedDagsterK8sConfig
    except ImportError:  # the shape is checked where dagster-k8s is installed (every step pod)
        resources = (value.get("container_config") or {}).get("resources")
    else:
        result = validate_config(USER_DEFINED_K8S_JOB_CONFIG_SCHEMA, value)
        if not result.success:
            raise _Problem(f"{where}: {label}: " + "; ".join(e.message for e in result.errors))
        try:
            config = UserDefinedDagsterK8sConfig.from_dict(value)
        except Exception as exc:  # unknown Kubernetes field names
            raise _Problem(f"{where}: {label}: {exc}.") from None
        resources = config.container_config.get("resources")
    resources = _check_resources(resources, label, where)
    if pool != GPU_POOL:
        gpus = sorted(n for part in ("requests", "limits") for n in (resources.get(part) or {}) if _is_gpu(n))
        if gpus:
            raise _Problem(f"{where}: {label} requests {gpus}; only the steps of the `gpu` pool get a GPU: "
                           f"move it to `executor.pool_k8s_config.gpu`.")


def k8s_executor_problem(executor: Mapping[str, Any], kind: str, where: str) -> str | None:
    """What is wrong with the Kubernetes keys of a profile's ``executor`` section (``kind`` its
    kind), naming the key and the fix; None when nothing is."""
    try:
        _check_k8s_executor(executor, kind, where)
    except _Problem as problem:
        return str(problem)
    return None


def _check_k8s_executor(executor: Mapping[str, Any], kind: str, where: str) -> None:
    present = [k for k in K8S_KEYS if executor.get(k) is not None]
    if kind != "k8s":
        if present:
            raise _Problem(f"{where}: `executor.{present[0]}` applies only with `kind: k8s` (kind is {kind!r}).")
        return
    k8s = executor.get("k8s") or {}
    problem = image_problem(image := _resolve_image(k8s.get("job_image"), where))
    if problem:
        raise _Problem(f"{where}: `executor.k8s.job_image` is {image!r}, which {problem}. Name a pinned tag "
                       f"or a digest, {IMAGE_EXAMPLE}: the tag you built and pushed (docs/kubernetes.md).")
    policy = k8s.get("image_pull_policy")
    if policy is not None and policy not in PULL_POLICIES:
        raise _Problem(f"{where}: `executor.k8s.image_pull_policy` is {policy!r}; choose one of "
                       f"{list(PULL_POLICIES)} (IfNotPresent, the default, suits a pinned tag).")
    try:
        from dagster._config import validate_config
        from dagster_k8s import k8s_job_executor
    except ImportError:
        pass
    else:
        result = validate_config(k8s_job_executor.config_schema.as_field().config_type, k8s)
        if not result.success:
            raise _Problem(f"{where}: `executor.k8s` is dagster-k8s's k8s_job_executor config: "
                           + "; ".join(e.message for e in result.errors))
    for label, resources in (("`executor.k8s.resources`", k8s.get("resources")),
                             ("`executor.k8s.step_k8s_config.container_config.resources`",
                              ((k8s.get("step_k8s_config") or {}).get("container_config") or {}).get("resources"))):
        if resources:
            raise _Problem(f"{where}: {label}: a step's resources come from its pool, "
                           "`executor.pool_k8s_config.gpu` (GPU steps) or `.default` (every other step); "
                           "move them there.")
    pools = executor.get("pool_k8s_config")
    if not isinstance(pools, dict) or not {GPU_POOL, DEFAULT_POOL} <= set(pools):
        raise _Problem(f"{where}: a `kind: k8s` profile sets `executor.pool_k8s_config` with `gpu` (the "
                       "resources of GPU steps: gradients, curvature, streaming scores, MAGIC, ...) and "
                       "`default` (every other step, CPU only), each in dagster-k8s's step_k8s_config form "
                       "with `container_config.resources` (see resources/kubernetes.yaml).")
    for pool, value in pools.items():
        _check_pool_config(str(pool), value, where)
    config_map = executor.get("pipelines_config_map")
    if config_map is not None:
        if not isinstance(config_map, str) or len(config_map) > 253 or not _DNS_SUBDOMAIN.fullmatch(config_map):
            raise _Problem(f"{where}: `executor.pipelines_config_map` is {config_map!r}, not a ConfigMap "
                           "name (lower-case letters, digits, '-' and '.'), e.g. attribution-pipelines.")
        env_names = [str(v).split("=", 1)[0] for v in k8s.get("env_vars") or []]
        volumes = [v.get("name") for v in k8s.get("volumes") or [] if isinstance(v, dict)]
        if PIPELINES_ENV in env_names or PIPELINES_VOLUME in volumes:
            raise _Problem(f"{where}: `executor.pipelines_config_map` sets ${PIPELINES_ENV} and the volume "
                           f"{PIPELINES_VOLUME!r} itself; remove them from `executor.k8s`.")


def executor_config(profile: Any) -> dict:
    """The ``k8s_job_executor`` config of ``profile``: its ``executor.k8s``, the pull policy's
    default, ``max_concurrent`` steps a run, and the pipelines ConfigMap's volume, mount and
    ``$ATTRIBUTION_PIPELINES``."""
    config = copy.deepcopy(dict(profile.k8s or {}))
    config.setdefault("image_pull_policy", "IfNotPresent")
    if profile.max_concurrent:
        config["max_concurrent"] = profile.max_concurrent
    if profile.pipelines_config_map:
        config["env_vars"] = [*(config.get("env_vars") or []), f"{PIPELINES_ENV}={PIPELINES_PATH}"]
        config["volumes"] = [*(config.get("volumes") or []),
                             {"name": PIPELINES_VOLUME, "config_map": {"name": profile.pipelines_config_map}}]
        config["volume_mounts"] = [*(config.get("volume_mounts") or []),
                                   {"name": PIPELINES_VOLUME, "mount_path": PIPELINES_DIR, "read_only": True}]
    return config


def _lay_over(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict:
    """``top`` over ``base``, one level deep (``container_config`` keys of ``top`` win, the rest stay)."""
    merged = dict(base)
    for name, value in top.items():
        merged[name] = {**(merged.get(name) or {}), **value} if isinstance(value, Mapping) else value
    return merged


def step_k8s_configs(job: dg.JobDefinition, pools: Mapping[str, Any],
                     explicit: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """The ``per_step_k8s_config`` of ``job``: each op's pool's config (``default`` for ops without
    one, or with a pool ``pools`` does not name), merged ``SHALLOW``, with ``explicit``'s entry for
    the op laid over it."""
    explicit = explicit or {}
    configs: dict[str, dict] = {}
    for handle in job.graph.iterate_node_handles():
        definition = job.get_node(handle).definition
        if not isinstance(definition, dg.OpDefinition):
            continue
        pool = definition.pool if definition.pool in pools else DEFAULT_POOL
        config = {"merge_behavior": "SHALLOW", **copy.deepcopy(dict(pools.get(pool) or {}))}
        if handle.name in explicit:
            config = _lay_over(config, explicit[handle.name])
        configs[handle.name] = config
    return configs


def k8s_executor(profile: Any) -> dg.ExecutorDefinition:
    """dagster-k8s's ``k8s_job_executor`` configured from ``profile`` (a ``DeploymentProfile``),
    whose steps get their pool's Kubernetes config (:func:`step_k8s_configs` of the run's job,
    when the run starts). Needs dagster-k8s (the ``k8s`` extra)."""
    from dagster_k8s import k8s_job_executor

    pools = dict(profile.pool_k8s_config or {})

    def create(init_context):
        config = init_context.executor_config
        per_step = step_k8s_configs(init_context.job.get_definition(), pools, config.get("per_step_k8s_config"))
        return k8s_job_executor.executor_creation_fn(
            init_context._replace(executor_config={**config, "per_step_k8s_config": per_step}))

    executor = dg.ExecutorDefinition(
        name="k8s", config_schema=k8s_job_executor.config_schema, requirements=k8s_job_executor.get_requirements,
        executor_creation_fn=create,
        description="dagster-k8s's k8s_job_executor; each step's pod gets its pool's Kubernetes config.")
    return executor.configured(executor_config(profile), name="k8s")
