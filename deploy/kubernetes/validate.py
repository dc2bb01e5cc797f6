"""Renders deploy/kubernetes with `kubectl kustomize` and validates every object
offline, as the API server would: built-in kinds against Kubernetes' own
OpenAPI schemas (kubernetes-validate, strict: an unknown field is an error),
custom resources (KEDA's, the Prometheus Operator's) against their CRDs'
published schemas, vendored in schemas/.

What is rendered: the base alone (it must hold no custom resource, so any
cluster can apply it), the base with each component, and the example overlay
(with its Secrets' *.env.example copied to *.env in a scratch copy). Also
checked: the keda component leaves the Deployment no replica count; every
object and pod template of the overlay has the recommended labels; its
generated Secrets and ConfigMap have hashed names that the objects using them
name; every environment name the dispatcher's container sets is a setting of
examples/dispatcher; every Secret env file has its .example.

  python3 deploy/kubernetes/validate.py [KUBERNETES_VERSION...]   (default 1.33 and 1.37)

Prints one line per object and exits non-zero with the list of problems.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# The oldest and the newest Kubernetes the manifests are meant for.
VERSIONS = sys.argv[1:] or ["1.33", "1.37"]
COMPONENTS = ["keda", "prometheus", "dispatcher"]
RECOMMENDED = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
]

CRDS = {
    ("keda.sh", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    ("keda.sh", "TriggerAuthentication"): "keda.sh_triggerauthentications.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}


def crd_schema(group, kind, version):
    crd = yaml.safe_load((HERE / "schemas" / CRDS[(group, kind)]).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version and v.get("served", True):
            return v["schema"]["openAPIV3Schema"]
    raise LookupError(f"{kind}: the vendored CRD serves no version {version}")


def forbid_unknown(schema):
    """A CRD's structural schema prunes unknown fields; here they are errors.
    (Go's regexes allow an inline flag after `^`; Python's want it first.)"""
    if isinstance(schema, dict):
        pattern = schema.get("pattern")
        if isinstance(pattern, str) and "(?i)" in pattern and not pattern.startswith("(?i)"):
            schema = {**schema, "pattern": "(?i)" + pattern.replace("(?i)", "")}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema = {**schema, "additionalProperties": False}
        return {k: forbid_unknown(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [forbid_unknown(v) for v in schema]
    return schema


def is_custom(doc):
    group = doc.get("apiVersion", "").rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


def check_document(where, doc, problems):
    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    group, _, version = api.rpartition("/")
    what = f"{where}: {kind} {doc.get('metadata', {}).get('name', '?')}"
    try:
        if (group, kind) in CRDS:
            jsonschema.validate(doc, forbid_unknown(crd_schema(group, kind, version)))
        elif is_custom(doc):
            raise LookupError(f"{kind}: no vendored schema for {api}")
        else:
            for version in VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
    except (jsonschema.ValidationError, kubernetes_validate.ValidationError, LookupError) as e:
        problems.append(f"{what}: {getattr(e, 'message', e)}")
        return
    print(f"ok  {what}")


def kustomize(path):
    """`kubectl kustomize PATH` (or `kustomize build PATH`): the rendered objects."""
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(path)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(path)]
    else:
        raise SystemExit("neither kubectl nor kustomize is installed: the manifests cannot be rendered")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def containers(doc):
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    return pod.get("containers", []) + pod.get("initContainers", [])


def dispatcher_settings():
    """The fields of dispatcher.py's Settings: one environment variable each."""
    source = (ROOT / "examples/dispatcher/dispatcher.py").read_text()
    body = source[source.index("class Settings(BaseSettings):"):]
    body = body[: body.index("\n\n\ndef ")]
    return set(re.findall(r"^    ([A-Z][A-Z0-9_]+)\s*:", body, re.M))


def check_sources(problems):
    for path in sorted(HERE.rglob("kustomization.yaml")):
        k = yaml.safe_load(path.read_text())
        for entry in k.get("resources", []) + k.get("components", []):
            if not (path.parent / entry).exists():
                problems.append(f"{path.relative_to(ROOT)}: {entry} does not exist")
        for generator in k.get("secretGenerator", []):
            for env_file in generator.get("envs", []):
                if not (path.parent / (env_file + ".example")).exists():
                    problems.append(f"{path.relative_to(ROOT)}: {env_file} has no {env_file}.example")


def render_all(scratch, problems):
    """(name, objects) for the base, the base with each component, the overlay."""
    tree = scratch / "kubernetes"
    shutil.copytree(HERE, tree, ignore=shutil.ignore_patterns("schemas", "*.env"))
    for example in (tree / "overlays").rglob("*.env.example"):
        shutil.copy(example, example.with_name(example.name[: -len(".example")]))
    renders = [("base", tree / "base")]
    for c in COMPONENTS:
        d = tree / f"with-{c}"
        d.mkdir()
        (d / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources: [../base]\ncomponents: [../components/{c}]\n"
        )
        renders.append((f"base + components/{c}", d))
    renders.append(("overlays/example", tree / "overlays" / "example"))
    out = []
    for name, path in renders:
        try:
            out.append((name, kustomize(path)))
        except RuntimeError as e:
            problems.append(f"{name}: {e}")
    return out


def check_overlay(objects, problems):
    settings = dispatcher_settings()
    generated = {}
    for doc in objects:
        kind, meta = doc["kind"], doc["metadata"]
        if kind in ("Secret", "ConfigMap"):
            base, _, suffix = meta["name"].rpartition("-")
            if not re.fullmatch(r"[a-z0-9]{10}", suffix):
                problems.append(f"overlay: {kind} {meta['name']} has no content hash in its name")
            generated[meta["name"]] = kind
        if kind in ("Secret", "ConfigMap", "Namespace"):
            continue
        labels = meta.get("labels", {})
        missing = [l for l in RECOMMENDED if l not in labels]
        if missing:
            problems.append(f"overlay: {kind} {meta['name']} lacks the labels {missing}")
        template = doc.get("spec", {}).get("template", {}).get("metadata", {}).get("labels")
        if template is not None:
            missing = [l for l in RECOMMENDED if l not in template]
            if missing:
                problems.append(f"overlay: {kind} {meta['name']}'s pod template lacks the labels {missing}")
        for c in containers(doc):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                for key in ("secretKeyRef", "configMapKeyRef"):
                    name = ref.get(key, {}).get("name")
                    if name is not None and name not in generated:
                        problems.append(f"overlay: {kind} {meta['name']} names {name}, which is not generated")
            if meta["name"] == "profile-email-dispatcher" and kind == "Deployment":
                for e in c.get("env", []):
                    if e["name"] not in settings:
                        problems.append(f"overlay: {e['name']} is no setting of dispatcher.py")
        if kind == "TriggerAuthentication":
            for ref in doc["spec"].get("secretTargetRef", []):
                if ref["name"] not in generated:
                    problems.append(f"overlay: TriggerAuthentication names {ref['name']}, which is not generated")
        if kind == "Deployment" and meta["name"] == "profile-worker" and "replicas" in doc["spec"]:
            problems.append("overlay: the worker Deployment sets replicas, which KEDA owns")
    check_hooks(objects, problems)


def check_hooks(objects, problems):
    """A Job that Argo CD runs as a PreSync hook runs before the sync makes
    anything else: every Secret or ConfigMap it reads must be a PreSync hook
    of an earlier wave, or the first sync's Job waits for it forever."""
    hook = "argocd.argoproj.io/hook"
    wave = "argocd.argoproj.io/sync-wave"
    by_name = {d["metadata"]["name"]: d for d in objects if d["kind"] in ("Secret", "ConfigMap")}
    for job in (d for d in objects if d["kind"] == "Job"):
        notes = job["metadata"].get("annotations", {})
        if notes.get(hook) != "PreSync":
            continue
        for c in containers(job):
            refs = [e.get("valueFrom", {}) for e in c.get("env", [])]
            names = {r.get(k, {}).get("name") for r in refs for k in ("secretKeyRef", "configMapKeyRef")}
            for name in sorted(n for n in names if n):
                got = by_name.get(name, {}).get("metadata", {}).get("annotations", {})
                if got.get(hook) != "PreSync" or int(got.get(wave, 0)) >= int(notes.get(wave, 0)):
                    problems.append(
                        f"overlay: Job {job['metadata']['name']} is a PreSync hook but {name} is not a "
                        "PreSync hook of an earlier wave"
                    )


def main():
    problems = []
    check_sources(problems)
    with tempfile.TemporaryDirectory() as scratch:
        renders = render_all(Path(scratch), problems)
    for name, objects in renders:
        for doc in objects:
            check_document(name, doc, problems)
        custom = sorted({d["kind"] for d in objects if is_custom(d)})
        if name == "base" and custom:
            problems.append(f"base: holds custom resources {custom}: a cluster without their CRDs cannot apply it")
        if name == "base":
            print(f"ok  base: no custom resource ({len(objects)} objects)")
        if name == "base + components/keda":
            worker = [d for d in objects if d["kind"] == "Deployment" and d["metadata"]["name"] == "profile-worker"]
            if not worker or "replicas" in worker[0]["spec"]:
                problems.append("components/keda: the worker Deployment keeps a replica count")
        if name == "overlays/example":
            check_overlay(objects, problems)
            print(f"ok  overlays/example: labels, hashed Secrets and their references ({len(objects)} objects)")
    if problems:
        print("\n".join(["problems:"] + problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
