"""Dask on Kubernetes: the DaskCluster spec for the Dask Kubernetes operator.

:func:`cluster_spec` turns the ``cluster.kubernetes`` config section into a
``kubernetes.dask.org/v1`` DaskCluster resource. The pods run ``dask scheduler`` and
``dask worker`` (distributed >= 2026.6 no longer ships the ``dask-scheduler`` and
``dask-worker`` commands that dask-kubernetes 2026.3 still writes), as a non-root user
without privilege escalation or capabilities, under the RuntimeDefault seccomp profile
(the "restricted" Pod Security Standard), and the dashboard stays inside the cluster (a
ClusterIP service). :func:`kube_cluster` hands the spec to dask-kubernetes' ``KubeCluster``.
"""

from __future__ import annotations

import copy
from typing import Any

from flashmm_dask.errors import ConfigError
from flashmm_dask.run.config import ClusterConfig

API_VERSION = "kubernetes.dask.org/v1"
SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
#: uid of the non-root user of deploy/kubernetes/Dockerfile
RUN_AS_USER = 10001

SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": False,
}
#: pod-level settings; with SECURITY_CONTEXT the pods meet the "restricted" Pod Security
#: Standard (which requires the RuntimeDefault seccomp profile)
POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "fsGroup": RUN_AS_USER,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _container(name: str, image: str, args: list[str], k: Any, ports: list[dict]) -> dict:
    env = [{"name": key, "value": str(value)} for key, value in sorted(dict(k.env).items())]
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "env": env,
        "resources": _plain(k.resources),
        "securityContext": copy.deepcopy(SECURITY_CONTEXT),
        "ports": ports,
    }


def _plain(obj: Any) -> Any:
    """Config objects (dataclasses or mappings) as plain dicts for the manifest."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _plain(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def cluster_spec(cfg: ClusterConfig, name: str = "flashmm") -> dict[str, Any]:
    """The DaskCluster resource for the ``cluster`` config section (kind kubernetes)."""
    k = cfg.kubernetes
    scheduler = _container(
        "scheduler",
        k.image,
        [
            "dask",
            "scheduler",
            "--port",
            str(SCHEDULER_PORT),
            "--dashboard-address",
            f":{DASHBOARD_PORT}",
        ],
        k,
        [
            {"name": "tcp-comm", "containerPort": SCHEDULER_PORT, "protocol": "TCP"},
            {"name": "http-dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"},
        ],
    )
    scheduler["readinessProbe"] = {
        "httpGet": {"port": "http-dashboard", "path": "/health"},
        "initialDelaySeconds": 5,
        "periodSeconds": 10,
    }
    worker = _container(
        "worker",
        k.image,
        [
            "dask",
            "worker",
            "--name",
            "$(DASK_WORKER_NAME)",
            "--nthreads",
            str(cfg.threads_per_worker),
            "--dashboard-address",
            f":{DASHBOARD_PORT}",
        ],
        k,
        [{"name": "http-dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"}],
    )
    spec: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "DaskCluster",
        "metadata": {"name": name},
        "spec": {
            "worker": {
                "replicas": int(k.n_workers),
                "spec": {
                    "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
                    "containers": [worker],
                },
            },
            "scheduler": {
                "spec": {
                    "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
                    "containers": [scheduler],
                },
                "service": {
                    "type": "ClusterIP",
                    "selector": {
                        "dask.org/cluster-name": name,
                        "dask.org/component": "scheduler",
                    },
                    "ports": [
                        {
                            "name": "tcp-comm",
                            "protocol": "TCP",
                            "port": SCHEDULER_PORT,
                            "targetPort": "tcp-comm",
                        },
                        {
                            "name": "http-dashboard",
                            "protocol": "TCP",
                            "port": DASHBOARD_PORT,
                            "targetPort": "http-dashboard",
                        },
                    ],
                },
            },
        },
    }
    if k.namespace:
        spec["metadata"]["namespace"] = k.namespace
    if k.service_account:
        for part in ("worker", "scheduler"):
            spec["spec"][part]["spec"]["serviceAccountName"] = k.service_account
    return spec


def kube_cluster(cfg: ClusterConfig) -> Any:
    """A dask-kubernetes ``KubeCluster`` running :func:`cluster_spec`."""
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise ConfigError(
            "cluster.kind 'kubernetes' needs dask-kubernetes; install it with "
            "pip install 'flashmm-dask[kubernetes]'"
        ) from None
    spec = cluster_spec(cfg)
    return KubeCluster(custom_cluster_spec=spec, namespace=cfg.kubernetes.namespace)
