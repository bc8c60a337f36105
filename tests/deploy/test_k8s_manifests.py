"""The Kubernetes manifests (deploy/k8s/) against the Kubernetes API schemas, with `kubernetes-validate`
(PyPI; strict: unknown fields are errors), and the wiring between them that no schema sees: selectors
and labels, the Redis URL, the ports, the probes, the affinity key. Nothing is applied to a cluster.

Skipped, saying why, without kubernetes-validate (pip install kubernetes-validate); under CI a failure.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
K8S_VERSION = "1.33.0"  # a version the clusters in use run; the schemas of later ones accept these too


@pytest.fixture(scope="module")
def validate() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        why = "needs kubernetes-validate (pip install kubernetes-validate; in the `dev` extra)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}, but this is CI", pytrace=False)
        pytest.skip(why)

    def check(doc: dict[str, Any]) -> None:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)

    return check


def documents() -> list[dict[str, Any]]:
    docs = [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, "no manifests under deploy/k8s"
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_matches_the_kubernetes_schema(validate: Any, doc: dict[str, Any]) -> None:
    validate(doc)


def test_the_validator_does_reject_a_mistake(validate: Any) -> None:
    import kubernetes_validate

    wrong = copy.deepcopy(find("Deployment", "rnnserve"))
    wrong["spec"]["template"]["spec"]["containers"][0]["port"] = 50051  # not a field: `ports`
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong)
    wrong = copy.deepcopy(find("Service", "rnnserve"))
    wrong["spec"]["ports"][0]["port"] = "fifty"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong)


def test_the_pieces_are_wired_together() -> None:
    deployment, service = find("Deployment", "rnnserve"), find("Service", "rnnserve")
    pod = deployment["spec"]["template"]
    server = pod["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9464}  # the image's RNNSERVE_PORT / RNNSERVE_METRICS_PORT
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9464"
    # Health: the gRPC health service of the rnnserve service (NOT_SERVING while draining).
    assert server["readinessProbe"]["grpc"] == {"port": 50051, "service": "rnnserve.v1.RnnServe"}
    assert pod["spec"]["terminationGracePeriodSeconds"] > int(
        next(e["value"] for e in server["env"] if e["name"] == "RNNSERVE_GRACE")
    )

    # The replicas share the Redis of redis.yaml, by its Service's name and port.
    env = {e["name"]: e["value"] for e in server["env"]}
    redis_service, redis_set = find("Service", "redis"), find("StatefulSet", "redis")
    assert env["RNNSERVE_SESSION_STORE"] == f"redis://redis:{redis_service['spec']['ports'][0]['port']}/0"
    redis_labels = redis_set["spec"]["template"]["metadata"]["labels"]
    assert redis_service["spec"]["selector"].items() <= redis_labels.items()
    assert not (service["spec"]["selector"].items() <= redis_labels.items()), "rnnserve would select redis"

    # Affinity: the Ingress hashes $rnnserve_route, which the controller's snippet defines from the
    # header the clients send, with a random key when there is none.
    from rnnserve.client.requests import SESSION_HEADER

    ingress = find("Ingress", "rnnserve")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$rnnserve_route"
    snippet = find("ConfigMap", "ingress-nginx-controller")["data"]["http-snippet"]
    header_variable = "$http_" + SESSION_HEADER.replace("-", "_")
    assert f"map {header_variable} $rnnserve_route" in snippet and "$request_id" in snippet
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "rnnserve", "port": {"name": "grpc"}}
