"""Checks deploy/kubernetes/*.yaml offline (run by epp/tests/it/kubernetes.rs with the tools venv).

- core kinds: kubernetes-validate --strict (Kubernetes' own schemas, shipped in the package);
- the InferencePool: the openAPIV3Schema of the vendored GIE CRD (deploy/kubernetes/crds/);
- that the objects refer to each other (pool -> box pods and port, picker Service; route ->
  pool and gateway).
Prints the gpuswap.toml texts of the ConfigMaps as JSON (the Rust test loads them with the real
configuration loader). Exits non-zero, saying why, on any finding.
"""
import json
import subprocess
import sys
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

crd = yaml.safe_load((root / "crds/inference.networking.k8s.io_inferencepools.yaml").read_text())
schemas = {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}
for pool in by_kind.get("InferencePool", []):
    version = pool["apiVersion"].split("/")[1]
    try:
        jsonschema.validate(pool, schemas[version])
    except (jsonschema.ValidationError, KeyError) as e:
        failures.append(f"InferencePool {pool['metadata']['name']}: {e}")

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
if failures:
    print("\n".join(failures), file=sys.stderr)
    sys.exit(1)
print(json.dumps(configs))
