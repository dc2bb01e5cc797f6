"""Validates every manifest under deploy/kubernetes offline, as the API server would:
built-in kinds against Kubernetes' own OpenAPI schemas (kubernetes-validate,
strict: an unknown field is an error), custom resources (KEDA's ScaledObject
and TriggerAuthentication, Prometheus Operator's ServiceMonitor) against their
CRDs' published schemas, vendored in schemas/. Also: every kustomization's
resources exist, every Secret env file has its .example, and every environment
name the dispatcher's containers set is a setting of examples/dispatcher.

  python3 deploy/kubernetes/validate.py [KUBERNETES_VERSION]   (default 1.33)

Prints one line per document and exits non-zero on the first problem's list.
"""

import re
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VERSION = sys.argv[1] if len(sys.argv) > 1 else "1.33"

CRDS = {
    ("keda.sh", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    ("keda.sh", "TriggerAuthentication"): "keda.sh_triggerauthentications.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
}


def crd_schema(group, kind, version):
    crd = yaml.safe_load((HERE / "schemas" / CRDS[(group, kind)]).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version and v.get("served", True):
            return v["schema"]["openAPIV3Schema"]
    raise LookupError(f"{kind}: the vendored CRD serves no version {version}")


def forbid_unknown(schema):
    """A CRD's structural schema prunes unknown fields; here they are errors."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema = {**schema, "additionalProperties": False}
        return {k: forbid_unknown(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [forbid_unknown(v) for v in schema]
    return schema


def check_document(path, doc, problems):
    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    group, _, version = api.rpartition("/")
    where = f"{path.relative_to(ROOT)}: {kind} {doc.get('metadata', {}).get('name', '?')}"
    try:
        if (group, kind) in CRDS:
            jsonschema.validate(doc, forbid_unknown(crd_schema(group, kind, version)))
        else:
            kubernetes_validate.validate(doc, VERSION, strict=True)
    except (jsonschema.ValidationError, kubernetes_validate.ValidationError, LookupError) as e:
        problems.append(f"{where}: {getattr(e, 'message', e)}")
        return
    print(f"ok  {where}")


def check_kustomization(path, problems):
    k = yaml.safe_load(path.read_text())
    for entry in k.get("resources", []):
        if not (path.parent / entry).exists():
            problems.append(f"{path.relative_to(ROOT)}: resource {entry} does not exist")
    for generator in k.get("secretGenerator", []):
        for env_file in generator.get("envs", []):
            example = path.parent / (env_file + ".example")
            if not example.exists():
                problems.append(f"{path.relative_to(ROOT)}: {env_file} has no {example.name} to start from")
    print(f"ok  {path.relative_to(ROOT)}: kustomization")


def dispatcher_settings():
    source = (ROOT / "examples/dispatcher/dispatcher.py").read_text()
    return set(re.findall(r'\benv\("([A-Z_]+)"', source))


def containers(doc):
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    return pod.get("containers", []) + pod.get("initContainers", [])


def main():
    problems = []
    settings = dispatcher_settings()
    for path in sorted(HERE.rglob("*.yaml")):
        if "schemas" in path.relative_to(HERE).parts:
            continue
        if path.name == "kustomization.yaml":
            check_kustomization(path, problems)
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            check_document(path, doc, problems)
            if doc.get("metadata", {}).get("name") == "profile-email-dispatcher" and doc["kind"] == "Deployment":
                for c in containers(doc):
                    for e in c.get("env", []):
                        if e["name"] not in settings:
                            problems.append(f"{path.relative_to(ROOT)}: {e['name']} is no setting of dispatcher.py")
    if problems:
        print("\n".join(["problems:"] + problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
