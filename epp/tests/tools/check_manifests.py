"""Checks deploy/kubernetes/*.yaml offline (run by epp/tests/it/kubernetes.rs with the tools venv).

- core kinds: kubernetes-validate --strict (Kubernetes' own schemas, shipped in the package);
- the InferencePool, the HTTPRoute and the Gateway: the openAPIV3Schema of the vendored CRDs
  (deploy/kubernetes/crds/: GIE's InferencePool, the Gateway API's standard Gateway and
  HTTPRoute), refusing unknown fields as strict field validation does. The CEL rules
  (x-kubernetes-validations) are not evaluated: no CEL here;
- that the objects refer to each other (pool -> box pods and port, picker Service; route ->
  pool and gateway; the pickers' Kubernetes discovery -> the pool's selector and port; their
  service account -> a Role that lets them list and watch pods and hold their Lease).
Prints the gpuswap.toml texts of the ConfigMaps as JSON (the Rust test loads them with the real
configuration loader). Exits non-zero, saying why, on any finding.
"""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import yaml

root = Path(sys.argv[1])
files = sorted((root).glob("*.yaml"))
failures = []

run = subprocess.run(
    [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet", *map(str, files)],
    capture_output=True,
    text=True,
)
if run.returncode != 0 or "ERROR" in run.stdout:
    failures.append("kubernetes-validate:\n" + run.stdout + run.stderr)

docs = [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)

def strict(schema):
    """The schema refusing unknown fields, as the API server does with strict field validation
    (kubectl's default): a structural schema otherwise drops them silently."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        # metadata is the API server's (ObjectMeta), described loosely in CRDs.
        out["additionalProperties"] = False
    return out

# The CRD kinds (deploy/kubernetes/crds/): InferencePool (GIE), Gateway and HTTPRoute (Gateway API).
crd_schemas = {}
for path in sorted((root / "crds").glob("*.yaml")):
    crd = yaml.safe_load(path.read_text())
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    for v in crd["spec"]["versions"]:
        schema = strict(v["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}
        crd_schemas[(f"{group}/{v['name']}", kind)] = schema
for kind in ("InferencePool", "Gateway", "HTTPRoute"):
    for doc in by_kind.get(kind, []):
        schema = crd_schemas.get((doc["apiVersion"], kind))
        if schema is None:
            failures.append(f"{kind} {doc['metadata']['name']}: no CRD schema for {doc['apiVersion']}")
            continue
        try:
            jsonschema.validate(doc, schema)
        except jsonschema.ValidationError as e:
            failures.append(f"{kind} {doc['metadata']['name']}: {e.message} at {list(e.absolute_path)}")

def one(kind):
    found = by_kind.get(kind, [])
    if len(found) != 1:
        failures.append(f"expected one {kind}, found {len(found)}")
        return {}
    return found[0]

pool, route, gateway = one("InferencePool"), one("HTTPRoute"), one("Gateway")
boxes = next((d for d in by_kind.get("DaemonSet", []) if d["metadata"]["name"] == "gpuswap-box"), None)
services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
if pool and boxes:
    labels = boxes["spec"]["template"]["metadata"]["labels"]
    wanted = pool["spec"]["selector"]["matchLabels"]
    if any(labels.get(k) != v for k, v in wanted.items()):
        failures.append(f"the pool's selector {wanted} does not select the box pods {labels}")
    ports = {p["containerPort"] for c in boxes["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    for target in pool["spec"]["targetPorts"]:
        if target["number"] not in ports:
            failures.append(f"the pool's target port {target['number']} is not a box port {ports}")
    picker = pool["spec"]["endpointPickerRef"]
    service = services.get(picker["name"])
    if not service or picker["port"]["number"] not in {p["port"] for p in service["spec"]["ports"]}:
        failures.append(f"the pool's endpoint picker {picker} is not a Service port")
if route:
    refs = [b for r in route["spec"]["rules"] for b in r["backendRefs"]]
    if not any(b.get("kind") == "InferencePool" and b["name"] == pool.get("metadata", {}).get("name") for b in refs):
        failures.append("the HTTPRoute does not send to the InferencePool")
    if gateway and not any(p["name"] == gateway["metadata"]["name"] for p in route["spec"]["parentRefs"]):
        failures.append("the HTTPRoute is not attached to the Gateway")

configs = {c["metadata"]["name"]: c["data"]["gpuswap.toml"] for c in by_kind.get("ConfigMap", []) if "gpuswap.toml" in c.get("data", {})}

pickers = next((d for d in by_kind.get("Deployment", []) if d["metadata"]["name"] == "gpuswap-epp"), None)
if pool and pickers and "gpuswap-epp" in configs:
    kube = tomllib.loads(configs["gpuswap-epp"])["epp"]["discovery"]["kubernetes"]
    wanted = ",".join(f"{k}={v}" for k, v in sorted(pool["spec"]["selector"]["matchLabels"].items()))
    if kube["selector"] != wanted:
        failures.append(f"the pickers select {kube['selector']!r}, the pool {wanted!r}")
    if kube["gateway_port"] not in {t["number"] for t in pool["spec"]["targetPorts"]}:
        failures.append(f"the pickers' gateway_port {kube['gateway_port']} is not the pool's target port")
    account = pickers["spec"]["template"]["spec"].get("serviceAccountName")
    namespace = pickers["metadata"]["namespace"]
    bound = [b["roleRef"]["name"] for b in by_kind.get("RoleBinding", [])
             if any(s["kind"] == "ServiceAccount" and s["name"] == account and s.get("namespace") == namespace for s in b["subjects"])]
    granted = {(g, r, v) for role in by_kind.get("Role", []) if role["metadata"]["name"] in bound
               for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    needed = {("", "pods", v) for v in ("list", "watch")} | {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}
    if needed - granted:
        failures.append(f"the pickers' service account {account!r} may not {sorted(needed - granted)}")
if failures:
    print("\n".join(failures), file=sys.stderr)
    sys.exit(1)
print(json.dumps(configs))
