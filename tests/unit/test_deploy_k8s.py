"""Kubernetes manifests (deploy/k8s): render base and overlays offline, validate against the Kubernetes
JSON schemas (kubernetes-validate, bundled, strict), and check they fit together the way a cluster needs."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.discovery import DiscoverySettings, parse_pool_selectors
from gateway.settings import Settings
from pools.sim.cli import build_parser as sim_parser

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
Doc = dict[str, Any]

# ---------------------------------------------------------------------------------------------------
# A small kustomize: resources, components, patches (strategic merge, JSON 6902, $patch: delete),
# namespace, labels, images, replicas, applied in kustomize's order. No kustomize binary is packaged
# for PyPI or Debian, so the tests render overlays with this.
# ---------------------------------------------------------------------------------------------------

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass"}


def load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def build(directory: Path) -> list[Doc]:
    """Render the kustomization in `directory`."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert k["kind"] == "Kustomization", directory
    return _apply(k, directory, [])


def _apply(k: Doc, directory: Path, docs: list[Doc]) -> list[Doc]:
    for r in k.get("resources", []):
        p = (directory / r).resolve()
        docs += build(p) if p.is_dir() else load_docs(p)
    for c in k.get("components", []):
        cdir = (directory / c).resolve()
        ck = yaml.safe_load((cdir / "kustomization.yaml").read_text())
        assert ck["kind"] == "Component", cdir
        docs = _apply(ck, cdir, docs)
    for patch in k.get("patches", []):
        docs = _patch(docs, patch, directory)
    if "namespace" in k:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = k["namespace"]
            for s in d.get("subjects", []) if d["kind"] in ("RoleBinding", "ClusterRoleBinding") else []:
                if s.get("kind") == "ServiceAccount":
                    s["namespace"] = k["namespace"]
    for entry in k.get("labels", []):
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(entry["pairs"])
            assert not entry.get("includeSelectors"), "selector labels not supported by this renderer"
    for image in k.get("images", []):
        for container in (c for d in docs for c in _containers(d)):
            name, tag = _split_image(container["image"])
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    for rep in k.get("replicas", []):
        matched = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == rep["name"]]
        assert matched, f"replicas: no workload {rep['name']}"
        for d in matched:
            d["spec"]["replicas"] = rep["count"]
    return docs


def _containers(doc: Doc) -> list[Doc]:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(pod.get("containers", [])) + list(pod.get("initContainers", []))


def _split_image(image: str) -> tuple[str, str]:
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    return name, tag


def _patch(docs: list[Doc], spec: Doc, directory: Path) -> list[Doc]:
    body = yaml.safe_load(spec["patch"] if "patch" in spec else (directory / spec["path"]).read_text())
    target = spec.get("target")
    if isinstance(body, list):  # JSON 6902
        assert target, "a JSON 6902 patch needs a target"
        matched = [d for d in docs if _selected(d, target)]
        assert matched, f"patch target matches nothing: {target}"
        for d in matched:
            for op in body:
                _json6902(d, op)
        return docs
    if target is None:
        target = {"kind": body["kind"], "name": body["metadata"]["name"]}
    matched = [d for d in docs if _selected(d, target)]
    assert matched, f"patch target matches nothing: {target}"
    if body.get("$patch") == "delete":
        return [d for d in docs if not any(d is m for m in matched)]
    body = {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
    body["metadata"] = {k: v for k, v in body.get("metadata", {}).items() if k != "name"}
    for d in matched:
        merged = _smp(d, body)
        d.clear()
        d.update(merged)
    return docs


def _selected(doc: Doc, target: Doc) -> bool:
    return all(
        (key not in target) or target[key] == value
        for key, value in (("kind", doc["kind"]), ("name", doc["metadata"]["name"]))
    )


def _smp(base: Any, patch: Any) -> Any:
    """Strategic merge: maps merge, null deletes, lists of named maps merge by name, other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: v for k, v in patch.items() if k != "$patch"}
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = _smp(out[key], value) if key in out else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        if any(p.get("$patch") == "replace" for p in patch):
            return [p for p in patch if p.get("$patch") != "replace"]
        merged = list(base)
        for item in patch:
            idx = next((i for i, b in enumerate(merged) if b["name"] == item["name"]), None)
            if idx is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[idx] = _smp(merged[idx], item)
        return merged
    return copy.deepcopy(patch)


def _named(items: list[Any]) -> bool:
    return all(isinstance(i, dict) and ("name" in i or i.get("$patch")) for i in items)


def _json6902(doc: Doc, op: Doc) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    parent: Any = doc
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op["op"] == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif op["op"] == "replace":
            parent[index] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del parent[index]
        else:
            raise AssertionError(f"unsupported op {op['op']}")
        return
    if op["op"] in ("replace", "remove"):
        assert last in parent, f"{op['op']} of a missing path {op['path']}"
    if op["op"] in ("add", "replace"):
        parent[last] = copy.deepcopy(op["value"])
    elif op["op"] == "remove":
        del parent[last]
    else:
        raise AssertionError(f"unsupported op {op['op']}")


def test_renderer_follows_kustomize_merge_rules() -> None:
    base = {"spec": {"a": 1, "b": 2, "list": [1, 2], "containers": [{"name": "x", "image": "i", "args": ["1"]}]}}
    patched = _smp(base, {"spec": {"b": None, "list": [3], "containers": [{"name": "x", "args": ["2"]}, {"name": "y"}]}})
    assert patched == {"spec": {"a": 1, "list": [3], "containers": [{"name": "x", "image": "i", "args": ["2"]}, {"name": "y"}]}}
    doc = {"spec": {"items": [{"v": 1}, {"v": 2}], "x": 1}}
    _json6902(doc, {"op": "replace", "path": "/spec/items/1", "value": {"v": 3}})
    _json6902(doc, {"op": "remove", "path": "/spec/x"})
    _json6902(doc, {"op": "add", "path": "/spec/items/-", "value": {"v": 4}})
    assert doc == {"spec": {"items": [{"v": 1}, {"v": 3}, {"v": 4}]}}
    assert _split_image("registry:5000/a/b:1.2") == ("registry:5000/a/b", "1.2")
    assert _split_image("pythia-gateway") == ("pythia-gateway", "")


# ---------------------------------------------------------------------------------------------------
# Rendered configurations
# ---------------------------------------------------------------------------------------------------


def _with_components(*components: str) -> list[Doc]:
    k = {"resources": [str(K8S / "base")], "components": [str(K8S / "components" / c) for c in components],
         "namespace": "pythia"}
    return _apply(k, K8S, [])


RENDERS = {
    "base": lambda: build(K8S / "base"),
    "dev": lambda: build(K8S / "overlays" / "dev"),
    "prod": lambda: build(K8S / "overlays" / "prod"),
    "prod-hpa": lambda: _with_components("monitoring", "autoscale-hpa"),
}


@pytest.fixture(scope="module", params=sorted(RENDERS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, RENDERS[request.param]()


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_spec(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def selector_terms(selector: str) -> dict[str, str]:
    terms = [t.strip() for t in selector.split(",") if t.strip()]
    assert all(re.fullmatch(r"[\w./-]+=[\w.-]+", t) for t in terms), f"only equality selectors: {selector}"
    return dict(t.split("=", 1) for t in terms)


# Minimal structural schemas for the CRDs the bundled Kubernetes schemas don't know.
CRD_SCHEMAS: dict[str, Doc] = {
    "keda.sh/v1alpha1/ScaledObject": {
        "type": "object",
        "required": ["spec"],
        "properties": {"spec": {
            "type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                  "name": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
                "fallback": {"type": "object", "required": ["failureThreshold", "replicas"], "additionalProperties": False,
                             "properties": {"failureThreshold": {"type": "integer"}, "replicas": {"type": "integer"}}},
                "advanced": {"type": "object"},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                   "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                   "metadata": {"type": "object", "additionalProperties": {"type": "string"}}}}},
            }}},
    },
    "monitoring.coreos.com/v1/ServiceMonitor": {
        "type": "object",
        "required": ["spec"],
        "properties": {"spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {k: {"type": "string"} for k in ("port", "path", "interval", "scrapeTimeout", "scheme")}}},
            }}},
    },
}

SCHEMA_VERSIONS = sorted(
    {kubernetes_validate.latest_version(), "1.29.0"}
    & {p.name.removeprefix("v").removesuffix("-local") for p in
       (Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema").iterdir()}
)


def test_manifests_validate_against_schemas(rendered: tuple[str, list[Doc]]) -> None:
    name, docs = rendered
    assert SCHEMA_VERSIONS, "no bundled Kubernetes schema versions"
    errors = []
    for d in docs:
        ident = f"{name}: {d['kind']}/{d['metadata']['name']}"
        crd = CRD_SCHEMAS.get(f"{d['apiVersion']}/{d['kind']}")
        if crd is not None:
            try:
                jsonschema.validate(d, crd)
            except jsonschema.ValidationError as exc:
                errors.append(f"{ident}: {exc.message} at {list(exc.absolute_path)}")
            continue
        for version in SCHEMA_VERSIONS:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{ident} (k8s {version}): {exc.message} at {list(exc.path)}")
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{ident}: no schema for {d['apiVersion']} {d['kind']} in k8s {version}")
    assert not errors, "\n".join(errors)


def test_names_unique_and_namespaced(rendered: tuple[str, list[Doc]]) -> None:
    name, docs = rendered
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"duplicate resources in {name}"
    if name != "base":
        namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] not in CLUSTER_SCOPED}
        assert namespaces == {"pythia-dev" if name == "dev" else "pythia"}


def test_services_pdbs_and_monitors_select_real_pods(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    deployments = find(docs, "Deployment")
    for svc in find(docs, "Service"):
        backends = [d for d in deployments if labels_match(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        assert backends, f"Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            for dep in backends:
                names = {p.get("name") for c in pod_spec(dep)["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in names, f"{svc['metadata']['name']}: no container port {port['targetPort']}"
    for dep in deployments:
        assert labels_match(dep["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
    for pdb in find(docs, "PodDisruptionBudget"):
        assert any(labels_match(pdb["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])
                   for d in deployments), pdb["metadata"]["name"]
    for sm in find(docs, "ServiceMonitor"):
        services = [s for s in find(docs, "Service") if labels_match(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert services, f"ServiceMonitor {sm['metadata']['name']} matches no Service"
        for ep in sm["spec"]["endpoints"]:
            assert all(ep["port"] in {p["name"] for p in s["spec"]["ports"]} for s in services)


def test_gateway_deployment(rendered: tuple[str, list[Doc]]) -> None:
    name, docs = rendered
    gw = one(docs, "Deployment", "pythia-gateway")
    assert gw["spec"]["replicas"] == (1 if name == "dev" else 3)
    spec = pod_spec(gw)
    (container,) = spec["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys() <= container["resources"]["limits"].keys() | {"cpu", "memory"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    # every PYTHIA_* setting comes from the ConfigMap, which must exist
    (source,) = container["envFrom"]
    config = one(docs, "ConfigMap", source["configMapRef"]["name"])
    known = {f"PYTHIA_{n.upper()}" for n in (*Settings.model_fields, *DiscoverySettings.model_fields)}
    assert set(config["data"]) <= known, f"unknown settings: {set(config['data']) - known}"
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    assert config["data"]["PYTHIA_PORT"] == str(port)
    # SIGTERM drain fits: preStop sleep + the gateway's own grace < the kubelet's kill deadline
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pre_stop + float(config["data"]["PYTHIA_SHUTDOWN_GRACE_S"]) < spec["terminationGracePeriodSeconds"]
    redis_host = config["data"]["PYTHIA_REDIS_URL"].split("//")[1].split(":")[0]
    one(docs, "Service", redis_host)
    # discovery needs a service account allowed to list and watch EndpointSlices
    assert config["data"]["PYTHIA_DISCOVERY"] == "k8s"
    sa = one(docs, "ServiceAccount", spec["serviceAccountName"])
    bindings = [b for b in find(docs, "RoleBinding")
                if any(s["kind"] == "ServiceAccount" and s["name"] == sa["metadata"]["name"] for s in b["subjects"])]
    rules = [r for b in bindings for r in one(docs, "Role", b["roleRef"]["name"])["rules"]]
    assert any("discovery.k8s.io" in r["apiGroups"] and "endpointslices" in r["resources"]
               and {"list", "watch"} <= set(r["verbs"]) for r in rules)


def _pool_backends(docs: list[Doc]) -> list[tuple[dict[str, Any], Doc, Doc]]:
    """Each pool of PYTHIA_POOLS with the one Service its selector finds and that Service's Deployment."""
    config = one(docs, "ConfigMap", "pythia-gateway-config")
    pools = json.loads(config["data"]["PYTHIA_POOLS"])
    selectors = {s.pool: s for s in parse_pool_selectors(pools, "pythia")}
    assert set(selectors) == {p["name"] for p in pools} == {"short", "long"}
    out = []
    for pool in pools:
        sel = selectors[pool["name"]]
        # EndpointSlices carry their Service's labels, so the selector must match exactly one Service
        services = [s for s in find(docs, "Service") if labels_match(selector_terms(sel.selector), s["metadata"]["labels"])]
        assert len(services) == 1, f"pool {pool['name']}: selector matches {len(services)} Services"
        svc = services[0]
        assert sel.port in {p["name"] for p in svc["spec"]["ports"]}
        (dep,) = [d for d in find(docs, "Deployment") if labels_match(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        out.append((pool, svc, dep))
    return out


def _flag(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("overlay", ["base", "prod"])
def test_vllm_pools_match_gateway_pools(overlay: str) -> None:
    docs = RENDERS[overlay]()
    vllm_config = one(docs, "ConfigMap", "pythia-vllm-config")["data"]
    seqs = {}
    for pool, _svc, dep in _pool_backends(docs):
        (c,) = pod_spec(dep)["containers"]
        args = c["args"]
        assert c["command"] == ["vllm", "serve"]
        assert args[0] == "$(MODEL_ID)" and "MODEL_ID" in vllm_config
        assert "--enable-prefix-caching" in args
        assert _flag(args, "--scheduling-policy") == "priority"
        assert int(_flag(args, "--max-model-len")) == pool["max_context_tokens"]
        assert _flag(args, "--served-model-name") == "$(SERVED_MODEL_NAME)"
        assert pool["models"] == [vllm_config["SERVED_MODEL_NAME"]]
        seqs[pool["name"]] = int(_flag(args, "--max-num-seqs"))
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
        assert int(_flag(args, "--port")) == port
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {p["httpGet"]["path"] for p in (c["startupProbe"], c["readinessProbe"], c["livenessProbe"])} == {"/health"}
        # weights come from the shared Hugging Face cache on a PVC
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
        claim = volumes["model-cache"]["persistentVolumeClaim"]["claimName"]
        one(docs, "PersistentVolumeClaim", claim)
        assert vllm_config["HF_HOME"].startswith(mounts["model-cache"])
    assert seqs["short"] > seqs["long"]  # many short sequences per GPU, few long ones


def test_dev_overlay_runs_simulated_engines_without_gpus() -> None:
    docs = RENDERS["dev"]()
    assert not find(docs, "PersistentVolumeClaim")
    assert "nvidia.com/gpu" not in json.dumps(docs)
    for _pool, _svc, dep in _pool_backends(docs):
        (c,) = pod_spec(dep)["containers"]
        assert c["image"] == "pythia-gateway:dev"
        assert c["args"][0] == "sim-engine" and _flag(c["args"], "--port") == "8000"
        sim = sim_parser().parse_args(c["args"][1:])  # the simulated engine accepts these flags
        assert sim.host == "0.0.0.0" and sim.scheduling_policy == "priority"
        assert "volumes" not in pod_spec(dep)
    assert one(docs, "Deployment", "pythia-vllm-short")["spec"]["replicas"] == 2
    assert one(docs, "ConfigMap", "pythia-gateway-config")["data"]["PYTHIA_WORKERS"] == "1"
    assert one(docs, "Deployment", "pythia-gateway")["spec"]["template"]["spec"]["containers"][0]["image"] == "pythia-gateway:dev"
    assert find(docs, "Namespace", "pythia-dev")


def test_prod_overlay_scales_each_pool_with_keda_on_the_forecast() -> None:
    docs = RENDERS["prod"]()
    assert pod_spec(one(docs, "Deployment", "pythia-gateway"))["containers"][0]["image"] == \
        "registry.example.com/pythia/pythia-gateway:0.1.0"
    assert one(docs, "ConfigMap", "pythia-gateway-config")["data"]["PYTHIA_WORKERS"] == "4"
    assert not find(docs, "HorizontalPodAutoscaler")
    for pool, _svc, dep in _pool_backends(docs):
        (so,) = [s for s in find(docs, "ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]]
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        query = trigger["metadata"]["query"]
        assert query.startswith("sum(pythia_pool_desired_replicas{") and f'pool="{pool["name"]}"' in query
        assert 'namespace="pythia"' in query and float(trigger["metadata"]["threshold"]) == 1
        assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    for sm in find(docs, "ServiceMonitor"):
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert {s["metadata"]["name"] for s in find(docs, "ServiceMonitor")} == {"pythia-gateway", "pythia-vllm"}


def test_hpa_alternative_reads_the_external_metric() -> None:
    docs = RENDERS["prod-hpa"]()
    assert not find(docs, "ScaledObject")
    for pool, _svc, dep in _pool_backends(docs):
        (hpa,) = [h for h in find(docs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["external"]["metric"] == {"name": "pythia_pool_desired_replicas",
                                                "selector": {"matchLabels": {"pool": pool["name"]}}}
        assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    values = yaml.safe_load((K8S / "components" / "autoscale-hpa" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["external"]
    assert rule["name"]["as"] == "pythia_pool_desired_replicas" and "by (pool)" in rule["metricsQuery"]
