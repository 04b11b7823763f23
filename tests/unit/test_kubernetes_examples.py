"""The Kubernetes example (examples/kubernetes/), checked offline: it cannot be applied here.

They parse; the ConfigMap's pplex.json is a valid config; container ports, Service
ports, probes, DNS and broker names agree with that config and with the admin routes;
the Dockerfile exposes the same ports and reads the config where the ConfigMap is mounted.
"""
import json
import os
import re

import yaml

from pplex.admin import build_app
from pplex.config import validate
from tests.helpers import ROOT

HERE = os.path.join(ROOT, "examples", "kubernetes")


def load(name):
    with open(os.path.join(HERE, name)) as handle:
        return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(handle) if doc}


def container(deployment):
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


def port_named(spec, name):
    return next(p["containerPort"] for p in spec["ports"] if p["name"] == name)


class _State:
    proxy = control = plugins = cluster = None


def admin_routes():
    return {route.rule for route in build_app(_State()).routes if route.method == "GET"}


def test_manifests_agree_with_the_config_and_the_routes():
    pplex, workers, nats = load("pplex.yaml"), load("workers.yaml"), load("nats.yaml")
    for docs in (pplex, workers, nats):
        for (kind, _), doc in docs.items():
            assert doc["metadata"]["namespace"] == "game", kind
    config = validate(json.loads(pplex["ConfigMap", "pplex-config"]["data"]["pplex.json"]), "pplex.yaml")

    deployment = pplex["Deployment", "pplex"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    spec = container(deployment)
    assert port_named(spec, "clients") == config["server"]["port"]
    assert port_named(spec, "admin") == config["management_server"]["port"]
    assert config["management_server"]["host"] == "0.0.0.0"  # probes come from the kubelet
    # The config file is where the ConfigMap is mounted.
    mount = next(m["mountPath"] for m in spec["volumeMounts"] if m["name"] == "config")
    assert spec["args"] == ["--config", f"{mount}/pplex.json"]
    # Probes: /healthz (open) on the admin port; /readyz with the token, on the same port.
    routes = admin_routes()
    live = spec["livenessProbe"]["httpGet"]
    assert live["path"] in routes and live["path"] == "/healthz" and live["port"] == "admin"
    ready = " ".join(spec["readinessProbe"]["exec"]["command"])
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", ready)
    assert int(url.group(1)) == config["management_server"]["port"]
    assert url.group(2) == "/readyz" and url.group(2) in routes
    assert "PPLEX_ADMIN_TOKEN" in ready and any(e["name"] == "PPLEX_ADMIN_TOKEN" for e in spec["env"])
    # One core per process.
    assert int(spec["resources"]["requests"]["cpu"]) == config["server"]["processes"]
    service = pplex["Service", "pplex"]
    assert service["spec"]["selector"] == pod["metadata"]["labels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["clients"]

    # Workers: a headless Service whose DNS name and port are the config's DNS upstream entry.
    [entry] = config["upstream"]
    headless = workers["Service", "workers"]
    assert headless["spec"]["clusterIP"] == "None"
    assert entry["dns"] == f"{headless['metadata']['name']}.{headless['metadata']['namespace']}.svc.cluster.local"
    assert [p["port"] for p in headless["spec"]["ports"]] == [entry["port"]]
    worker_deployment = workers["Deployment", "game-worker"]
    assert headless["spec"]["selector"] == worker_deployment["spec"]["template"]["metadata"]["labels"]
    worker = container(worker_deployment)
    assert port_named(worker, "grpc") == entry["port"]
    assert worker["command"][-1] == str(entry["port"])

    # The broker: the config's URL names the NATS Service and its port.
    broker = re.match(r"nats://([\w.-]+):(\d+)$", config["cluster"]["broker"])
    nats_service = nats["Service", "nats"]
    assert broker.group(1) == f"nats.{nats_service['metadata']['namespace']}.svc.cluster.local"
    assert int(broker.group(2)) == nats_service["spec"]["ports"][0]["port"]
    assert port_named(container(nats["Deployment", "nats"]), "client") == int(broker.group(2))


def test_dockerfile_exposes_the_ports_and_reads_the_mounted_config():
    with open(os.path.join(HERE, "Dockerfile")) as handle:
        text = handle.read()
    config = validate(json.loads(load("pplex.yaml")["ConfigMap", "pplex-config"]["data"]["pplex.json"]))
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()}
    assert exposed == {config["server"]["port"], config["management_server"]["port"]}
    assert re.search(r'^ENTRYPOINT \["pplex"\]$', text, re.M)
    assert 'CMD ["--config", "/etc/pplex/pplex.json"]' in text
    for copied in re.findall(r"^COPY (\S+)", text, re.M):  # what it copies exists in the repository
        assert os.path.exists(os.path.join(ROOT, copied)), copied
