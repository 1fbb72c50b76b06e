#!/usr/bin/env python3
"""Validates deploy/kubernetes offline: renders each kustomization (base and overlays) the way
kustomize would for the features used here, checks every object against the Kubernetes JSON
schemas (PyPI kubernetes-validate, strict), checks that selectors select the Deployment's pods,
and validates manifests no kustomization uses (the Secret template) on their own.

    k8s_validate.py [--kubernetes-version 1.30.0 ...] [--extract-config KUSTOMIZATION OUT]

kubectl is not needed: only the kustomize features this repository uses are supported
(resources, images, strategic-merge patches by kind and name, JSON 6902 patches with a target).
An unsupported feature is an error, never silently ignored.
"""

import argparse
import copy
import pathlib
import sys
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
SUPPORTED = {"apiVersion", "kind", "resources", "images", "patches"}


class Invalid(Exception):
    pass


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def key(obj):
    return (obj.get("kind"), obj.get("metadata", {}).get("name"))


def strategic_merge(base, patch):
    """Dicts merge key by key; lists of named objects (containers, env, ports, volumes) merge by
    name; any other list is replaced, as strategic merge does for lists without a merge key."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    named = lambda xs: isinstance(xs, list) and all(isinstance(x, dict) and "name" in x for x in xs)
    if named(base) and named(patch) and patch:
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            for i, existing in enumerate(out):
                if existing["name"] == item["name"]:
                    out[i] = strategic_merge(existing, item)
                    break
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def json_pointer(path):
    if not path.startswith("/"):
        raise Invalid(f"JSON patch path {path!r} does not start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(obj, ops):
    obj = copy.deepcopy(obj)
    for op in ops:
        *parents, last = json_pointer(op["path"])
        target = obj
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        kind = op["op"]
        if kind == "add" and isinstance(target, list):
            target.insert(len(target) if last == "-" else int(last), op["value"])
        elif kind in ("add", "replace"):
            if isinstance(target, list):
                target[int(last)] = op["value"]
            else:
                target[last] = op["value"]
        elif kind == "remove":
            del target[int(last) if isinstance(target, list) else last]
        elif kind == "test":
            found = target[int(last)] if isinstance(target, list) else target.get(last)
            if found != op["value"]:
                raise Invalid(f"JSON patch test failed at {op['path']}: {found!r} != {op['value']!r}")
        else:
            raise Invalid(f"JSON patch op {kind!r} is not supported here")
    return obj


def render(directory):
    """The objects `kustomize build directory` would print, and the files it used."""
    directory = pathlib.Path(directory)
    spec_path = directory / "kustomization.yaml"
    (spec,) = load_docs(spec_path)
    unsupported = set(spec) - SUPPORTED
    if unsupported:
        raise Invalid(f"{spec_path}: unsupported kustomize fields {sorted(unsupported)}")
    used = {spec_path.resolve()}
    objects = []
    for res in spec.get("resources", []):
        path = (directory / res).resolve()
        if path.is_dir():
            sub, sub_used = render(path)
            objects += sub
            used |= sub_used
        else:
            objects += load_docs(path)
            used.add(path)
    for patch in spec.get("patches", []):
        path = (directory / patch["path"]).resolve()
        used.add(path)
        (body,) = load_docs(path)
        if isinstance(body, list):
            target = patch.get("target") or {}
            matches = [
                i for i, o in enumerate(objects)
                if all(key(o)[j] == target.get(f) for j, f in ((0, "kind"), (1, "name")))
            ]
            if len(matches) != 1:
                raise Invalid(f"{path}: target {target} matches {len(matches)} objects")
            objects[matches[0]] = json_patch(objects[matches[0]], body)
        else:
            matches = [i for i, o in enumerate(objects) if key(o) == key(body)]
            if len(matches) != 1:
                raise Invalid(f"{path}: {key(body)} matches {len(matches)} objects")
            objects[matches[0]] = strategic_merge(objects[matches[0]], body)
    for image in spec.get("images", []):
        for obj in objects:
            for c in pod_spec(obj).get("containers", []) if pod_spec(obj) else []:
                if c.get("image", "").split(":")[0] == image["name"]:
                    c["image"] = f'{image.get("newName", image["name"])}:{image["newTag"]}'
    return objects, used


def pod_spec(obj):
    return obj.get("spec", {}).get("template", {}).get("spec") if obj.get("kind") == "Deployment" else None


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def cross_checks(name, objects):
    """Selectors that select nothing, and config that does not parse, pass the schemas."""
    problems = []
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    if len(deployments) != 1:
        return [f"{name}: expected one Deployment, found {len(deployments)}"]
    dep = deployments[0]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    if not selects(dep["spec"]["selector"]["matchLabels"], pod_labels):
        problems.append(f"{name}: the Deployment's selector does not select its own pods")
    for obj in objects:
        kind = obj["kind"]
        spec = obj.get("spec", {})
        selector = {
            "Service": spec.get("selector"),
            "PodDisruptionBudget": spec.get("selector", {}).get("matchLabels"),
            "NetworkPolicy": spec.get("podSelector", {}).get("matchLabels"),
        }.get(kind)
        if kind in ("Service", "PodDisruptionBudget", "NetworkPolicy") and not selects(selector, pod_labels):
            problems.append(f"{name}: {kind} {key(obj)[1]} does not select the broker's pods")
        if kind == "HorizontalPodAutoscaler" and spec["scaleTargetRef"]["name"] != dep["metadata"]["name"]:
            problems.append(f"{name}: the HPA scales something else")
        if kind == "ConfigMap" and "broker.toml" in obj.get("data", {}):
            try:
                tomllib.loads(obj["data"]["broker.toml"])
            except tomllib.TOMLDecodeError as e:
                problems.append(f"{name}: broker.toml does not parse: {e}")
    names = {key(o)[1] for o in objects if o["kind"] == "ConfigMap"}
    for volume in pod_spec(dep).get("volumes", []):
        cm = volume.get("configMap", {}).get("name")
        if cm and cm not in names:
            problems.append(f"{name}: volume {volume['name']} names a missing ConfigMap {cm}")
    return problems


def broker_toml(objects):
    for obj in objects:
        if obj["kind"] == "ConfigMap" and "broker.toml" in obj.get("data", {}):
            return obj["data"]["broker.toml"]
    raise Invalid("no ConfigMap with broker.toml")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kubernetes-version", action="append", dest="versions")
    parser.add_argument("--extract-config", nargs=2, metavar=("KUSTOMIZATION", "OUT"))
    args = parser.parse_args()

    if args.extract_config:
        objects, _ = render(args.extract_config[0])
        pathlib.Path(args.extract_config[1]).write_text(broker_toml(objects), encoding="utf-8")
        return 0

    import kubernetes_validate

    versions = args.versions or ["1.30.0", kubernetes_validate.utils.latest_version()]
    kustomizations = sorted(p.parent for p in ROOT.rglob("kustomization.yaml"))
    rendered, used = {}, set()
    for directory in kustomizations:
        objects, files = render(directory)
        rendered[str(directory.relative_to(ROOT))] = objects
        used |= files
    standalone = [p for p in sorted(ROOT.rglob("*.yaml")) if p.resolve() not in used]

    problems = []
    checked = 0

    def validate(label, obj):
        nonlocal checked
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{label} {key(obj)} (Kubernetes {version}): {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{label} {key(obj)}: no schema: {e}")
            checked += 1

    for name, objects in rendered.items():
        for obj in objects:
            validate(name, obj)
        problems += cross_checks(name, objects)
    for path in standalone:
        for obj in load_docs(path):
            validate(str(path.relative_to(ROOT)), obj)

    # An overlay changes only what it says it changes: the rest of its config matches the base.
    base = tomllib.loads(broker_toml(rendered["base"]))
    for name, objects in rendered.items():
        overlay = tomllib.loads(broker_toml(objects))
        if {k: v for k, v in overlay.items() if k != "store"} != {k: v for k, v in base.items() if k != "store"}:
            problems.append(f"{name}: broker.toml differs from the base outside [store]")

    for p in problems:
        print(f"INVALID {p}", file=sys.stderr)
    print(f"{checked} manifest checks in {len(rendered)} kustomizations and {len(standalone)} "
          f"standalone files against Kubernetes {', '.join(versions)}: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (Invalid, KeyError, ValueError, OSError, yaml.YAMLError) as e:
        print(f"INVALID {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
