"""deploy/k8s: render every overlay with kustomize and check what a cluster would get, offline.

- every document validates against the Kubernetes JSON schemas (kubernetes-validate, strict:
  unknown fields are errors) of a recent Kubernetes version;
- the ConfigMap's TOML loads with geogate's own config loader, and the overlay's region, the
  gateway's bind names, the replica pool (kind, SRV discovery, repository) agree with it;
- every geogate container's command line parses with geogate's own CLI parser;
- probes use the real health paths, and those paths answer 200 on a real replica process;
- Services and PodDisruptionBudgets select pods that exist, Service ports match container ports;
- the GPU and Triton variants request a GPU and run what they claim; security contexts hold.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import tempfile
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from core.config import Config, load_config
from replicas.demo.onnx_model import write_repository_entry
from tests.gateway_procs import GatewayProc
from tests.procs import TRITON_WRAPPER, Proc, ReplicaProc, free_port, http_ok

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.35"  # recent; kubernetes-validate bundles the schemas (no network)
HEALTH_PATHS = {"/v2/health/ready", "/v2/health/live"}
GEOGATE_IMAGES = ("registry.example.com/geogate/geogate:", "registry.example.com/geogate/geogate-gpu:")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")


def _load_render_module():
    spec = importlib.util.spec_from_file_location("geogate_k8s_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_mod = _load_render_module()
OVERLAYS = render_mod.overlay_names()


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render_mod.render(name) for name in OVERLAYS}


# ------------------------------------------------------------------ helpers


def _of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def _config_map(docs: list[dict], prefix: str) -> dict:
    found = [d for d in docs if d["kind"] == "ConfigMap" and re.fullmatch(rf"{prefix}(-[a-z0-9]{{10}})?",
                                                                         d["metadata"]["name"])]
    assert len(found) == 1, f"expected one ConfigMap {prefix}[-hash], found {[d['metadata']['name'] for d in found]}"
    return found[0]


def _pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def _workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _container_ports(workload: dict) -> dict[str, tuple[int, str]]:
    """name -> (port, protocol) over every container of the pod."""
    ports = {}
    for c in _pod_spec(workload)["containers"]:
        for p in c.get("ports", []):
            ports[p["name"]] = (p["containerPort"], p.get("protocol", "TCP"))
    return ports


def _env_value(docs: list[dict], container: dict, name: str) -> str:
    for env in container.get("env", []):
        if env["name"] != name:
            continue
        if "value" in env:
            return env["value"]
        ref = env["valueFrom"].get("configMapKeyRef")
        assert ref, f"env {name} of {container['name']}: only literal or ConfigMap values are expanded here"
        cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ref["name"]]
        assert cms, f"env {name} refers to ConfigMap {ref['name']!r}, which the overlay does not define"
        return cms[0]["data"][ref["key"]]
    raise AssertionError(f"container {container['name']}: $({name}) used but no env {name}")


def _expanded_args(docs: list[dict], container: dict) -> list[str]:
    """The container's args with Kubernetes' $(VAR) expansion applied."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: _env_value(docs, container, m.group(1)), a)
            for a in container.get("args", [])]


def _world_config(docs: list[dict], tmp_dir: Path) -> Config:
    cm = _config_map(docs, "geogate-config")
    path = tmp_dir / "geogate.toml"
    path.write_text(cm["data"]["geogate.toml"])
    return load_config(path)


def _region_of(docs: list[dict]) -> str:
    return _config_map(docs, "geogate-region")["data"]["region"]


# ------------------------------------------------------------------ tests


def test_every_component_is_rendered_by_some_overlay():
    assert set(OVERLAYS) >= {"eu-west", "us-east", "ap-south"}, OVERLAYS
    used: set[str] = set()
    for name in OVERLAYS:
        kust = yaml.safe_load((K8S / "overlays" / name / "kustomization.yaml").read_text())
        used |= {Path(c).name for c in kust.get("components", [])}
    components = {p.name for p in (K8S / "components").iterdir() if p.is_dir()}
    assert components <= used, f"components no overlay renders (so no test checks them): {components - used}"


def test_every_document_validates_against_kubernetes_schemas(rendered):
    secrets = [d for d in yaml.safe_load_all((K8S / "secrets.example.yaml").read_text()) if d]
    checked = 0
    for name, docs in [*rendered.items(), ("secrets.example.yaml", secrets)]:
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at "
                            f"{'/'.join(map(str, exc.path))}")
            checked += 1
    assert checked >= 3 * 12


def test_schema_validation_is_strict(rendered):
    """The validator really rejects a misspelt field: the test above would catch one."""
    gateway = copy.deepcopy(_one(rendered["eu-west"], "Deployment", "geogate-gateway"))
    _pod_spec(gateway)["containers"][0]["readinesProbe"] = _pod_spec(gateway)["containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, K8S_VERSION, strict=True)


def test_config_map_is_a_valid_geogate_config_for_the_overlay_region(rendered, tmp_path):
    for name, docs in rendered.items():
        cfg = _world_config(docs, tmp_path)
        region = cfg.region(_region_of(docs))  # raises ConfigError naming the region if unknown
        assert region.name == name, f"overlay {name} runs --region {region.name}"
        assert {r.name for r in cfg.regions} == set(OVERLAYS), "every overlay is a region of the world config"
        # The gateway binds the host of its region's listeners: the overlay maps it to 0.0.0.0.
        gateway = _one(docs, "Deployment", "geogate-gateway")
        aliases = {h: a["ip"] for a in _pod_spec(gateway).get("hostAliases", []) for h in a["hostnames"]}
        for listener in (region.http, region.grpc, region.admin):
            host, _, port = listener.rpartition(":")
            assert aliases.get(host) == "0.0.0.0", f"{name}: gateway pod does not bind {host} (hostAliases)"
            assert int(port) in {p for p, _ in _container_ports(gateway).values()}, \
                f"{name}: {listener} is not a gateway container port"


def test_replica_pool_matches_the_replica_workload(rendered, tmp_path):
    for name, docs in rendered.items():
        cfg = _world_config(docs, tmp_path)
        (pool,) = cfg.region(name).pools
        replica = _one(docs, "StatefulSet", "geogate-replica")
        (container,) = _pod_spec(replica)["containers"]
        # Kind: tritonserver for a triton pool, geogate replica otherwise.
        if pool.kind == "triton":
            assert container["command"] == ["tritonserver"], f"{name}: triton pool but replica runs {container}"
            assert "--model-control-mode=explicit" in container["args"]
            assert f"--model-repository={pool.repository}" in container["args"]
        else:
            assert container["image"].startswith(GEOGATE_IMAGES)
            assert container["args"][0] == "replica"
            assert f"--repository={pool.repository}" in container["args"]
        # The repository is the shared volume: read-only for replicas; the sync agent mounts
        # the volume's root read-write (repository and staging on one filesystem: atomic rename).
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts[pool.repository].get("readOnly") is True
        assert mounts[pool.repository].get("subPath") == Path(pool.repository).name
        sync = _one(docs, "Deployment", "geogate-sync")
        (sync_mount,) = [m for m in _pod_spec(sync)["containers"][0]["volumeMounts"]
                         if m["name"] == mounts[pool.repository]["name"]]
        assert sync_mount["mountPath"] == str(Path(pool.repository).parent)
        assert not sync_mount.get("readOnly", False) and "subPath" not in sync_mount
        claims = [{v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in _pod_spec(w)["volumes"]}
                  for w in (replica, sync)]
        assert claims[0][mounts[pool.repository]["name"]] == claims[1][sync_mount["name"]]
        pvc = _one(docs, "PersistentVolumeClaim", claims[0][mounts[pool.repository]["name"]])
        assert "ReadWriteMany" in pvc["spec"]["accessModes"]
        # The pool lists exactly the StatefulSet's pods, by their stable names, on the gRPC port.
        svc = _one(docs, "Service", replica["spec"]["serviceName"])
        assert svc["spec"].get("clusterIP") == "None", "per-pod names need a headless Service"
        assert svc["spec"].get("publishNotReadyAddresses") is True, "sync must reach replicas still loading"
        assert _selects(svc["spec"]["selector"], _pod_labels(replica))
        (grpc_port,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc_port.get("appProtocol") == "grpc"
        sts, ns = replica["metadata"]["name"], replica["metadata"]["namespace"]
        expected = [f"grpc://{sts}-{i}.{svc['metadata']['name']}.{ns}.svc.cluster.local:{grpc_port['port']}"
                    for i in range(replica["spec"]["replicas"])]
        assert pool.replicas == expected, f"{name}: config pool and StatefulSet disagree"


def test_geogate_command_lines_parse_with_the_real_cli(rendered):
    from gateway.cli import SUBCOMMANDS, build_parser

    seen: set[str] = set()
    for name, docs in rendered.items():
        for workload in _workloads(docs):
            for container in _pod_spec(workload)["containers"]:
                if not container["image"].startswith(GEOGATE_IMAGES):
                    continue
                argv = _expanded_args(docs, container)
                assert argv and argv[0] in SUBCOMMANDS, f"{name}: {container['name']} runs {argv}"
                try:
                    build_parser(argv).parse_args(argv)
                except SystemExit:
                    pytest.fail(f"{name}: `geogate {' '.join(argv)}` ({workload['metadata']['name']}) "
                                "is rejected by geogate's CLI parser")
                seen.add(argv[0])
                if argv[0] in ("gateway", "sync", "dns"):
                    config_arg = [a for a in argv if a.startswith("--config=")]
                    assert config_arg, f"{name}: {argv[0]} without --config"
                    mount_dir = str(Path(config_arg[0].split("=", 1)[1]).parent)
                    assert mount_dir in {m["mountPath"] for m in container["volumeMounts"]}
                if argv[0] in ("gateway", "sync"):
                    assert f"--{'region' if argv[0] == 'gateway' else 'site'}={name}" in argv
    assert seen >= {"gateway", "replica", "sync", "dns"}, seen


def test_probes_use_real_health_paths_on_declared_ports(rendered):
    for name, docs in rendered.items():
        for workload in _workloads(docs):
            ports = _container_ports(workload)
            for c in _pod_spec(workload)["containers"]:
                assert "livenessProbe" in c and "readinessProbe" in c, f"{name}: {c['name']} lacks probes"
                for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                    probe = c.get(kind)
                    if not probe:
                        continue
                    action = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
                    assert action, f"{name}: {c['name']} {kind} has no http/tcp/grpc action"
                    port = action["port"]
                    assert port in ports or port in {p for p, _ in ports.values()}, \
                        f"{name}: {c['name']} {kind} probes port {port!r}, not a container port"
                    if "httpGet" in probe:
                        # The sync agent serves only /metrics (tests/e2e/test_deploy_observability.py
                        # scrapes it on a real agent); everything else has KServe health paths.
                        allowed = {"/metrics"} if c["name"] == "sync" else HEALTH_PATHS
                        assert probe["httpGet"]["path"] in allowed, f"{name}: {c['name']} {kind}"
        replica = _pod_spec(_one(docs, "StatefulSet", "geogate-replica"))["containers"][0]
        assert replica["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert replica["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


@pytest.fixture(scope="module")
def real_replica():
    """A real `geogate replica` process on the tiny demo model."""
    with tempfile.TemporaryDirectory(prefix="geogate-deploy-") as repo:
        write_repository_entry(repo, 1, size="tiny")
        proc = ReplicaProc(repo)
        try:
            proc.wait_ready(90)
            yield proc
        finally:
            proc.stop()


def test_replica_probe_and_scrape_paths_answer_on_a_real_replica(rendered, real_replica):
    replica = _one(rendered["eu-west"], "StatefulSet", "geogate-replica")
    (container,) = _pod_spec(replica)["containers"]
    by_port = {"http": real_replica.http_port, 8000: real_replica.http_port,
               "metrics": real_replica.metrics_port, 8002: real_replica.metrics_port}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[kind]["httpGet"]
        with urllib.request.urlopen(f"http://127.0.0.1:{by_port[get['port']]}{get['path']}", timeout=10) as r:
            assert r.status == 200, f"{kind} {get['path']}"
    notes = replica["spec"]["template"]["metadata"]["annotations"]
    url = f"http://127.0.0.1:{by_port[int(notes['prometheus.io/port'])]}{notes['prometheus.io/path']}"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200 and b"geogate_replica_" in r.read()


def test_gateway_probe_and_scrape_paths_answer_on_a_real_gateway(rendered, real_replica, tmp_path):
    gateway_deploy = _one(rendered["eu-west"], "Deployment", "geogate-gateway")
    (container,) = _pod_spec(gateway_deploy)["containers"]
    gw = GatewayProc(tmp_path, replicas=[f"grpc://{real_replica.grpc_url}"])
    try:
        gw.wait_ready(90)
        by_port = {"http": gw.http_port, 8000: gw.http_port, "admin": gw.admin_port, 8002: gw.admin_port}
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = container[kind]["httpGet"]
            assert http_ok(f"http://127.0.0.1:{by_port[get['port']]}{get['path']}", 5), f"{kind} {get['path']}"
        notes = gateway_deploy["spec"]["template"]["metadata"]["annotations"]
        with urllib.request.urlopen(f"http://127.0.0.1:{by_port[int(notes['prometheus.io/port'])]}"
                                    f"{notes['prometheus.io/path']}", timeout=10) as r:
            assert r.status == 200 and b"geogate_requests" in r.read()
    finally:
        gw.stop()


def _triton_variant(rendered) -> tuple[str, dict, dict]:
    for name, docs in rendered.items():
        replica = _one(docs, "StatefulSet", "geogate-replica")
        (c,) = _pod_spec(replica)["containers"]
        if c.get("command") == ["tritonserver"]:
            return name, replica, c
    raise AssertionError("no overlay runs the Triton variant")


def test_triton_variant_args_run_a_real_tritonserver(rendered, tmp_path):
    """The Triton container's exact arguments, on free loopback ports and an empty repository,
    start a real tritonserver (`make triton-env`) whose probe and scrape paths answer 200."""
    _name, replica, c = _triton_variant(rendered)
    ports = {"--http-port": free_port(), "--grpc-port": free_port(), "--metrics-port": free_port()}
    args = []
    for a in c["args"]:
        flag, _, value = a.partition("=")
        if flag in ports:
            value = str(ports[flag])
        elif flag == "--model-repository":
            value = str(tmp_path)
        args.append(f"{flag}={value}")
    args += ["--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"]
    assert TRITON_WRAPPER.exists(), f"{TRITON_WRAPPER} missing: run `make triton-env`"
    proc = Proc([str(TRITON_WRAPPER), *args], name="triton-deploy")
    try:
        by_port = {"http": ports["--http-port"], 8000: ports["--http-port"],
                   "metrics": ports["--metrics-port"], 8002: ports["--metrics-port"]}
        proc.wait_until(lambda: http_ok(f"http://127.0.0.1:{by_port['http']}/v2/health/ready"), 90)
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = c[kind]["httpGet"]
            assert http_ok(f"http://127.0.0.1:{by_port[get['port']]}{get['path']}", 5), f"{kind} {get['path']}"
        notes = replica["spec"]["template"]["metadata"]["annotations"]
        assert http_ok(f"http://127.0.0.1:{by_port[int(notes['prometheus.io/port'])]}{notes['prometheus.io/path']}", 5)
    finally:
        proc.stop(timeout_s=40)


def test_services_select_pods_and_target_declared_ports(rendered):
    for name, docs in rendered.items():
        workloads = _workloads(docs)
        for svc in _of_kind(docs, "Service"):
            targets = [w for w in workloads if _selects(svc["spec"]["selector"], _pod_labels(w))]
            assert targets, f"{name}: Service {svc['metadata']['name']} selects no pod"
            for w in targets:
                ports = _container_ports(w)
                for p in svc["spec"]["ports"]:
                    target = p.get("targetPort", p["port"])
                    if isinstance(target, str):
                        assert target in ports, f"{name}: {svc['metadata']['name']}:{p['name']} -> {target!r}"
                        _number, protocol = ports[target]
                    else:
                        matches = [v for v in ports.values() if v[0] == target]
                        assert matches, f"{name}: {svc['metadata']['name']}:{p['name']} -> {target}"
                        _number, protocol = matches[0]
                    assert protocol == p.get("protocol", "TCP")
                    if p["name"] == "grpc":
                        assert p.get("appProtocol") == "grpc"
        gateway = _one(docs, "Service", "geogate-gateway")
        assert {p["name"]: p["port"] for p in gateway["spec"]["ports"]} == {"http": 8000, "grpc": 8001}
        admin = _one(docs, "Service", "geogate-gateway-admin")
        assert admin["spec"]["type"] == "ClusterIP", "the admin API stays inside the cluster"
        assert [p["port"] for p in admin["spec"]["ports"]] == [8002]


def test_pdbs_select_existing_pods(rendered):
    for name, docs in rendered.items():
        pdbs = _of_kind(docs, "PodDisruptionBudget")
        covered = set()
        for pdb in pdbs:
            selector = pdb["spec"]["selector"]["matchLabels"]
            targets = [w for w in _workloads(docs) if _selects(selector, _pod_labels(w))]
            assert targets, f"{name}: PDB {pdb['metadata']['name']} selects no pod"
            assert all(w["metadata"]["namespace"] == pdb["metadata"]["namespace"] for w in targets)
            covered |= {w["metadata"]["name"] for w in targets}
        assert {"geogate-gateway", "geogate-replica"} <= covered, f"{name}: PDBs cover {covered}"


def test_security_context_resources_and_scrape_annotations(rendered):
    for name, docs in rendered.items():
        for w in _workloads(docs):
            spec = _pod_spec(w)
            where = f"{name}: {w['metadata']['name']}"
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
            assert spec.get("automountServiceAccountToken") is False, where
            ports = _container_ports(w)
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["readOnlyRootFilesystem"] is True, where
                assert sc["capabilities"]["drop"] == ["ALL"], where
                for section in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][section]), f"{where}: {section}"
            notes = w["spec"]["template"]["metadata"].get("annotations", {})
            if notes.get("prometheus.io/scrape") == "true":
                assert int(notes["prometheus.io/port"]) in {p for p, _ in ports.values()}, where
                assert notes["prometheus.io/path"] == "/metrics", where
        scraped = {w["metadata"]["name"] for w in _workloads(docs)
                   if w["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/scrape") == "true"}
        assert {"geogate-gateway", "geogate-replica", "geogate-sync", "geogate-dns"} <= scraped, \
            f"{name}: scraped {scraped}"


def test_gpu_and_triton_variants(rendered, tmp_path):
    kinds = {}
    for name, docs in rendered.items():
        (c,) = _pod_spec(_one(docs, "StatefulSet", "geogate-replica"))["containers"]
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        if c.get("command") == ["tritonserver"]:
            kinds[name] = "triton"
            assert c["image"].startswith("nvcr.io/nvidia/tritonserver:")
            assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(c["args"])
        elif c["image"].startswith("registry.example.com/geogate/geogate-gpu:"):
            kinds[name] = "gpu"
            assert gpus == 1, f"{name}: GPU image without a GPU"
        else:
            kinds[name] = "cpu"
            assert gpus is None, f"{name}: CPU image holding a GPU"
        if kinds[name] != "cpu":
            assert gpus == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert set(kinds.values()) == {"cpu", "gpu", "triton"}, kinds


def test_secret_references_are_defined_by_the_example(rendered):
    secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "secrets.example.yaml").read_text()) if d}
    for s in secrets.values():
        assert all(v.startswith("REPLACE_WITH_") for v in s["stringData"].values()), "placeholders only"
    for name, docs in rendered.items():
        assert not _of_kind(docs, "Secret"), f"{name}: overlays must never carry secrets"
        for w in _workloads(docs):
            for c in _pod_spec(w)["containers"]:
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in secrets[ref["name"]]["stringData"], f"{name}: {ref}"
                for src in c.get("envFrom", []):
                    if "secretRef" in src:
                        assert src["secretRef"]["name"] in secrets, f"{name}: {src}"
