"""A schema of the Kubernetes / KubeRay fields that dd2dist's manifests use, checked on rendered output.

kubeconform needs the RayCluster/RayJob CRD schemas from the network, so this checks what we rely on instead:
required fields and their types, resource quantities, GPU requests, volume mounts against defined volumes,
references between objects (ConfigMaps, Secrets, PVCs, Services, the RayJob's cluster), pinned image tags,
the Ray containers' /dev/shm, shared storage, tracking URI and preStop hook, and the RayJob's entrypoint.

Usage: ``python infra/k8s/validate.py infra/k8s/overlays/gpu-8x [more dirs]``; exit status 1 on any problem.
Every check returns messages that start with ``<Kind>/<name>`` and the field path.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

GPU = "nvidia.com/gpu"
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_SUFFIX = {
    "": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}
_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?\d+)?")
ACCESS_MODES = {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"}
KNOWN_KINDS = {
    "ConfigMap", "Secret", "PersistentVolumeClaim", "Service", "Deployment", "StatefulSet", "Job",
    "RayCluster", "RayJob",
}


def parse_quantity(value: Any) -> Decimal:
    """A Kubernetes resource quantity ("500m", "16Gi", "1e3", 2) as a number; ValueError when malformed."""
    text = str(value).strip()
    match = _QUANTITY.fullmatch(text)
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, suffix = match.group(1), match.group(2) or ""
    try:
        base = Decimal(number)
    except InvalidOperation as err:
        raise ValueError(f"not a Kubernetes quantity: {value!r}") from err
    if suffix[:1] in ("e", "E"):
        return base * Decimal(10) ** int(suffix[1:])
    return base * Decimal(_SUFFIX[suffix])


def image_problem(image: Any) -> str | None:
    """Why an image reference is not pinned (None when it is: an explicit non-latest tag, or a digest)."""
    if not isinstance(image, str) or not image:
        return f"image must be a non-empty string, got {image!r}"
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image!r} has no tag"
    tag = last.split(":", 1)[1]
    if tag == "latest" or not re.search(r"\d", tag):
        return f"image {image!r} is not pinned to a version"
    return None


class Checker:
    """Collects problems over one rendered set of manifests (one overlay or one deployment)."""

    def __init__(self, manifests: list[dict[str, Any]], ray_version: str | None = None):
        self.manifests = manifests
        self.ray_version = ray_version
        self.problems: list[str] = []
        self.by_kind: dict[str, dict[str, dict[str, Any]]] = {}
        for doc in manifests:
            name = (doc.get("metadata") or {}).get("name")
            self.by_kind.setdefault(str(doc.get("kind")), {})[str(name)] = doc

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    # -- generic ------------------------------------------------------------------------------------------

    def check_all(self) -> list[str]:
        """Run every check; returns the list of problems (empty = valid)."""
        seen: set[tuple[str, str]] = set()
        for doc in self.manifests:
            kind, meta = doc.get("kind"), doc.get("metadata")
            where = f"{kind}/{(meta or {}).get('name')}"
            if not isinstance(doc.get("apiVersion"), str) or not doc["apiVersion"]:
                self.fail(where, "apiVersion is missing")
            if kind not in KNOWN_KINDS:
                self.fail(where, f"kind {kind!r} is not one this schema knows ({', '.join(sorted(KNOWN_KINDS))})")
                continue
            if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
                self.fail(where, "metadata.name is missing")
                continue
            if not DNS_SUBDOMAIN.fullmatch(meta["name"]):
                self.fail(where, f"metadata.name {meta['name']!r} is not a DNS-1123 name")
            if (kind, meta["name"]) in seen:
                self.fail(where, "defined twice")
            seen.add((kind, meta["name"]))
            getattr(self, f"check_{kind}")(where, doc)
        return self.problems

    def _mapping(self, where: str, obj: Any, path: str) -> dict[str, Any]:
        if not isinstance(obj, dict):
            self.fail(where, f"{path} must be a mapping, got {type(obj).__name__}")
            return {}
        return obj

    def check_ConfigMap(self, where: str, doc: dict[str, Any]) -> None:
        for key, value in self._mapping(where, doc.get("data", {}), "data").items():
            if not isinstance(value, str):
                self.fail(where, f"data.{key} must be a string (quote numbers), got {value!r}")

    def check_Secret(self, where: str, doc: dict[str, Any]) -> None:
        if not doc.get("data") and not doc.get("stringData"):
            self.fail(where, "has neither data nor stringData")

    def check_PersistentVolumeClaim(self, where: str, doc: dict[str, Any]) -> None:
        spec = self._mapping(where, doc.get("spec"), "spec")
        modes = spec.get("accessModes")
        if not isinstance(modes, list) or not modes or not set(modes) <= ACCESS_MODES:
            self.fail(where, f"spec.accessModes must be a non-empty subset of {sorted(ACCESS_MODES)}, got {modes}")
        size = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
        self._quantity(where, "spec.resources.requests.storage", size, positive=True)

    def check_Service(self, where: str, doc: dict[str, Any]) -> None:
        spec = self._mapping(where, doc.get("spec"), "spec")
        ports = spec.get("ports")
        if not isinstance(ports, list) or not ports:
            self.fail(where, "spec.ports must be a non-empty list")
        for i, port in enumerate(ports or []):
            if not isinstance(port.get("port"), int) or not 0 < port["port"] < 65536:
                self.fail(where, f"spec.ports[{i}].port must be an int in 1..65535, got {port.get('port')!r}")
        selector = spec.get("selector")
        if not isinstance(selector, dict) or not selector:
            self.fail(where, "spec.selector must be a non-empty mapping")
            return
        targets = [
            d for kind in ("Deployment", "StatefulSet") for d in self.by_kind.get(kind, {}).values()
            if selector.items() <= ((d.get("spec") or {}).get("template", {}).get("metadata", {})
                                    .get("labels", {}) or {}).items()
        ]
        if not targets:
            self.fail(where, f"spec.selector {selector} matches no Deployment/StatefulSet pod template")

    def _workload(self, where: str, doc: dict[str, Any]) -> None:
        spec = self._mapping(where, doc.get("spec"), "spec")
        template = self._mapping(where, spec.get("template"), "spec.template")
        if doc["kind"] in ("Deployment", "StatefulSet"):
            selector = (spec.get("selector") or {}).get("matchLabels")
            labels = (template.get("metadata") or {}).get("labels") or {}
            if not isinstance(selector, dict) or not selector or not selector.items() <= labels.items():
                self.fail(where, "spec.selector.matchLabels must be non-empty and match spec.template labels")
            if not isinstance(spec.get("replicas", 1), int) or spec.get("replicas", 1) < 0:
                self.fail(where, f"spec.replicas must be a non-negative int, got {spec.get('replicas')!r}")
        if doc["kind"] == "StatefulSet" and spec.get("serviceName") not in self.by_kind.get("Service", {}):
            self.fail(where, f"spec.serviceName {spec.get('serviceName')!r} is not a rendered Service")
        self.pod_spec(where, "spec.template.spec", template.get("spec"),
                      claim_templates=[(c.get("metadata") or {}).get("name")
                                       for c in spec.get("volumeClaimTemplates", [])])

    check_Deployment = _workload
    check_StatefulSet = _workload
    check_Job = _workload

    # -- pods -----------------------------------------------------------------------------------------------

    def _quantity(self, where: str, path: str, value: Any, positive: bool = False) -> Decimal | None:
        if value is None:
            self.fail(where, f"{path} is missing")
            return None
        try:
            number = parse_quantity(value)
        except ValueError as err:
            self.fail(where, f"{path}: {err}")
            return None
        if number < 0 or (positive and number == 0):
            self.fail(where, f"{path} must be {'> 0' if positive else '>= 0'}, got {value!r}")
        return number

    def pod_spec(self, where: str, path: str, spec: Any, claim_templates: Iterable[str] = ()) -> None:
        """Containers, resources, mounts and references of one pod spec."""
        spec = self._mapping(where, spec, path)
        volumes = spec.get("volumes") or []
        volume_names = [v.get("name") for v in volumes] + [c for c in claim_templates if c]
        if len(set(volume_names)) != len(volume_names):
            self.fail(where, f"{path}.volumes has duplicate names {volume_names}")
        for i, volume in enumerate(volumes):
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if "persistentVolumeClaim" in volume and claim not in self.by_kind.get("PersistentVolumeClaim", {}):
                self.fail(where, f"{path}.volumes[{i}] claims {claim!r}, which is not a rendered PVC")
            secret = (volume.get("secret") or {}).get("secretName")
            if "secret" in volume and secret not in self.by_kind.get("Secret", {}):
                self.fail(where, f"{path}.volumes[{i}] mounts Secret {secret!r}, which is not rendered")
        containers = spec.get("containers")
        if not isinstance(containers, list) or not containers:
            self.fail(where, f"{path}.containers must be a non-empty list")
            return
        all_containers = [(f"{path}.initContainers[{i}]", c) for i, c in enumerate(spec.get("initContainers") or [])]
        all_containers += [(f"{path}.containers[{i}]", c) for i, c in enumerate(containers)]
        names = [c.get("name") for _, c in all_containers]
        if len(set(names)) != len(names):
            self.fail(where, f"{path}: container names repeat: {names}")
        for cpath, container in all_containers:
            self.container(where, cpath, container, volume_names)
        tolerated = any(t.get("key") == GPU and t.get("operator") in ("Exists", "Equal")
                        for t in spec.get("tolerations") or [])
        if self.gpus(spec) and not tolerated:
            self.fail(where, f"{path} requests GPUs but has no toleration for the {GPU} taint")

    def container(self, where: str, path: str, container: dict[str, Any], volume_names: list[str]) -> None:
        name = container.get("name")
        if not isinstance(name, str) or not DNS_LABEL.fullmatch(name):
            self.fail(where, f"{path}.name {name!r} is not a DNS-1123 label")
        problem = image_problem(container.get("image"))
        if problem:
            self.fail(where, f"{path}: {problem}")
        for field in ("command", "args"):
            value = container.get(field)
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                self.fail(where, f"{path}.{field} must be a list of strings, got {value!r}")
        resources = container.get("resources") or {}
        requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
        if not requests or not limits:
            self.fail(where, f"{path}.resources needs both requests and limits")
        for section, values in (("requests", requests), ("limits", limits)):
            for resource, value in values.items():
                self._quantity(where, f"{path}.resources.{section}.{resource}", value)
        for resource in set(requests) & set(limits):
            try:
                if parse_quantity(requests[resource]) > parse_quantity(limits[resource]):
                    self.fail(where, f"{path}.resources: {resource} request {requests[resource]} > limit")
            except ValueError:
                pass
        if GPU in requests or GPU in limits:
            gpu_req, gpu_lim = requests.get(GPU), limits.get(GPU)
            if gpu_req is None or gpu_lim is None or str(gpu_req) != str(gpu_lim):
                self.fail(where, f"{path}.resources: {GPU} requests ({gpu_req}) and limits ({gpu_lim}) must be equal")
            elif not str(gpu_lim).isdigit() or int(gpu_lim) < 1:
                self.fail(where, f"{path}.resources: {GPU} must be a positive whole number, got {gpu_lim!r}")
        mounts = container.get("volumeMounts") or []
        paths = [m.get("mountPath") for m in mounts]
        if len(set(paths)) != len(paths):
            self.fail(where, f"{path}.volumeMounts: a mountPath repeats: {paths}")
        for i, mount in enumerate(mounts):
            if mount.get("name") not in volume_names:
                self.fail(where, f"{path}.volumeMounts[{i}] names volume {mount.get('name')!r}, "
                                 f"not among {volume_names}")
            if not str(mount.get("mountPath", "")).startswith("/"):
                self.fail(where, f"{path}.volumeMounts[{i}].mountPath must be absolute")
        for i, source in enumerate(container.get("envFrom") or []):
            ref = (source.get("configMapRef") or {}).get("name")
            if "configMapRef" in source and ref not in self.by_kind.get("ConfigMap", {}):
                self.fail(where, f"{path}.envFrom[{i}] names ConfigMap {ref!r}, which is not rendered")
            ref = (source.get("secretRef") or {}).get("name")
            if "secretRef" in source and ref not in self.by_kind.get("Secret", {}):
                self.fail(where, f"{path}.envFrom[{i}] names Secret {ref!r}, which is not rendered")
        for i, env in enumerate(container.get("env") or []):
            if not isinstance(env.get("name"), str):
                self.fail(where, f"{path}.env[{i}].name is missing")
            if "value" in env and not isinstance(env["value"], str):
                self.fail(where, f"{path}.env[{i}] ({env.get('name')}) value must be a string, got {env['value']!r}")
            for ref_kind, ref_field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                ref = (env.get("valueFrom") or {}).get(ref_field)
                if ref is None:
                    continue
                target = self.by_kind.get(ref_kind, {}).get(ref.get("name"))
                keys = set((target or {}).get("data") or {}) | set((target or {}).get("stringData") or {})
                if target is None or ref.get("key") not in keys:
                    self.fail(where, f"{path}.env[{i}] ({env.get('name')}) reads {ref_kind} "
                                     f"{ref.get('name')!r} key {ref.get('key')!r}, which is not rendered")

    @staticmethod
    def gpus(pod_spec: dict[str, Any]) -> int:
        """GPUs a pod spec asks for (sum of its containers' limits)."""
        total = 0
        for container in pod_spec.get("containers") or []:
            value = ((container.get("resources") or {}).get("limits") or {}).get(GPU)
            if value is not None and str(value).isdigit():
                total += int(value)
        return total

    # -- KubeRay ----------------------------------------------------------------------------------------

    def ray_pod(self, where: str, path: str, group: dict[str, Any]) -> dict[str, Any]:
        """Checks shared by the head group and every worker group; returns the Ray container."""
        params = self._mapping(where, group.get("rayStartParams", {}), f"{path}.rayStartParams")
        for key, value in params.items():
            if not isinstance(value, str):
                self.fail(where, f"{path}.rayStartParams.{key} must be a string (KubeRay), got {value!r}")
        template = self._mapping(where, group.get("template"), f"{path}.template")
        spec = self._mapping(where, template.get("spec"), f"{path}.template.spec")
        self.pod_spec(where, f"{path}.template.spec", spec)
        containers = spec.get("containers") or [{}]
        ray = containers[0]  # KubeRay runs Ray in the first container
        volumes = {v.get("name"): v for v in spec.get("volumes") or []}
        mounts = {m.get("mountPath"): m.get("name") for m in ray.get("volumeMounts") or []}
        shm = volumes.get(mounts.get("/dev/shm"), {}).get("emptyDir") or {}
        if shm.get("medium") != "Memory":
            self.fail(where, f"{path}: the Ray container needs /dev/shm from an emptyDir with medium: Memory")
        else:
            self._quantity(where, f"{path}: /dev/shm sizeLimit", shm.get("sizeLimit"), positive=True)
        pre_stop = (((ray.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or []
        if "ray stop" not in " ".join(pre_stop):
            self.fail(where, f"{path}: the Ray container needs lifecycle.preStop exec `ray stop`, got {pre_stop}")
        env_maps = [self.by_kind.get("ConfigMap", {}).get((s.get("configMapRef") or {}).get("name"))
                    for s in ray.get("envFrom") or []]
        env_keys = {k for cm in env_maps if cm for k in (cm.get("data") or {})}
        env_keys |= {e.get("name") for e in ray.get("env") or []}
        if "MLFLOW_TRACKING_URI" not in env_keys:
            self.fail(where, f"{path}: MLFLOW_TRACKING_URI is not injected into the Ray container")
        cluster_env = {k: v for cm in env_maps if cm for k, v in (cm.get("data") or {}).items()}
        if cluster_env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
            self.fail(where, f"{path}: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray on loopback")
        security = spec.get("securityContext") or {}
        if not security.get("runAsNonRoot"):
            self.fail(where, f"{path}.template.spec.securityContext.runAsNonRoot must be true")
        return {"spec": spec, "mounts": mounts, "volumes": volumes}

    def cluster_spec(self, where: str, path: str, spec: Any) -> None:
        spec = self._mapping(where, spec, path)
        version = spec.get("rayVersion")
        if not isinstance(version, str):
            self.fail(where, f"{path}.rayVersion must be a string, got {version!r}")
        elif self.ray_version and version != self.ray_version:
            self.fail(where, f"{path}.rayVersion {version} differs from the installed ray {self.ray_version}")
        head = self.ray_pod(where, f"{path}.headGroupSpec", self._mapping(where, spec.get("headGroupSpec"),
                                                                         f"{path}.headGroupSpec"))
        if self.gpus(head["spec"]):
            self.fail(where, f"{path}.headGroupSpec asks for GPUs: training runs on the worker groups")
        groups = spec.get("workerGroupSpecs")
        if not isinstance(groups, list) or not groups:
            self.fail(where, f"{path}.workerGroupSpecs must be a non-empty list")
            return
        names = [g.get("groupName") for g in groups]
        if len(set(names)) != len(names) or not all(isinstance(n, str) and DNS_LABEL.fullmatch(n) for n in names):
            self.fail(where, f"{path}.workerGroupSpecs group names must be unique DNS labels, got {names}")
        # mountPath -> PVC claim, for the Ray container's mounts that come from a PVC (the shared storage).
        head_storage = self.pvc_mounts(head)
        if not head_storage:
            self.fail(where, f"{path}.headGroupSpec mounts no PersistentVolumeClaim (shared run storage)")
        for i, group in enumerate(groups):
            gpath = f"{path}.workerGroupSpecs[{i}]"
            worker = self.ray_pod(where, gpath, group)
            counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
            if not all(isinstance(c, int) and c >= 0 for c in counts) or not counts[0] <= counts[1] <= counts[2]:
                self.fail(where, f"{gpath}: need ints minReplicas <= replicas <= maxReplicas, got {counts}")
            worker_storage = self.pvc_mounts(worker)
            if worker_storage != head_storage:
                self.fail(where, f"{gpath}: shared storage mounts {worker_storage} differ from the head's "
                                 f"{head_storage}")

    @staticmethod
    def pvc_mounts(pod: dict[str, Any]) -> dict[str, str]:
        """mountPath -> claimName of the Ray container's PVC-backed mounts (from :meth:`ray_pod`'s result)."""
        claims = {name: (vol.get("persistentVolumeClaim") or {}).get("claimName")
                  for name, vol in pod["volumes"].items()}
        return {path: claims[name] for path, name in pod["mounts"].items() if claims.get(name)}

    def check_RayCluster(self, where: str, doc: dict[str, Any]) -> None:
        self.cluster_spec(where, "spec", doc.get("spec"))

    def check_RayJob(self, where: str, doc: dict[str, Any]) -> None:
        spec = self._mapping(where, doc.get("spec"), "spec")
        selector = spec.get("clusterSelector")
        if selector:
            name = selector.get("ray.io/cluster")
            cluster = self.by_kind.get("RayCluster", {}).get(name)
            if cluster is None:
                self.fail(where, f"spec.clusterSelector names RayCluster {name!r}, which is not rendered")
        elif "rayClusterSpec" in spec:
            self.cluster_spec(where, "spec.rayClusterSpec", spec["rayClusterSpec"])
            cluster = {"spec": spec["rayClusterSpec"]}
        else:
            self.fail(where, "spec needs clusterSelector or rayClusterSpec")
            cluster = None
        entrypoint = spec.get("entrypoint")
        if not isinstance(entrypoint, str):
            self.fail(where, "spec.entrypoint must be a string")
            return
        words = shlex.split(entrypoint)
        if words[:2] != ["python", "jobs/distill.py"]:
            self.fail(where, f"spec.entrypoint must run `python jobs/distill.py`, got {entrypoint!r}")
        config = words[words.index("--config") + 1] if "--config" in words[:-1] else None
        if not config or not re.fullmatch(r"configs/[\w./-]+\.yaml", config):
            self.fail(where, f"spec.entrypoint needs --config configs/<...>.yaml, got {entrypoint!r}")
        output = words[words.index("--output") + 1] if "--output" in words[:-1] else None
        if cluster is not None:
            head_group = (cluster.get("spec") or {}).get("headGroupSpec") or {}
            head_spec = (head_group.get("template") or {}).get("spec") or {}
            ray = (head_spec.get("containers") or [{}])[0]
            shared = self.pvc_mounts({
                "volumes": {v.get("name"): v for v in head_spec.get("volumes") or []},
                "mounts": {m.get("mountPath"): m.get("name") for m in ray.get("volumeMounts") or []},
            })
            if not output or not any(output.startswith(p.rstrip("/") + "/") for p in shared):
                self.fail(where, f"spec.entrypoint --output {output!r} is not on the shared storage {sorted(shared)}")
        if spec.get("shutdownAfterJobFinishes") and selector:
            self.fail(where, "shutdownAfterJobFinishes cannot be used with clusterSelector")


def validate(manifests: list[dict[str, Any]], ray_version: str | None = None) -> list[str]:
    """All problems found in one rendered set of manifests (empty = valid)."""
    return Checker(manifests, ray_version).check_all()


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from render import render  # noqa: PLC0415 - sibling script, importable when run as a file

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    status = 0
    for directory in argv or ["infra/k8s/overlays/cpu-smoke", "infra/k8s/overlays/gpu-8x"]:
        problems = validate(render(directory), ray_version)
        print(f"{directory}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for problem in problems:
            print(f"  {problem}")
        status |= bool(problems)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
