"""deploy/: the Kubernetes manifests against the Kubernetes schemas and a few rules, the Dockerfile
against the README's build step, and conversation-affine routing through Debian's nginx in front
of two `xgen serve` replicas on a fixture model (loopback only). Run by `tests/run`."""
import copy
import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request

import kubernetes_validate
import yaml
from conftest import ROOT, free_port, start_xgen, wait_healthy

DEPLOY = os.path.join(ROOT, "deploy")
K8S_VERSION = "1.30.0"
CUSTOM_KINDS = {"PodMonitor"}  # Prometheus Operator CRD: not in the Kubernetes schemas


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def base_objects():
    base = os.path.join(DEPLOY, "k8s", "base")
    kustomization = load(os.path.join(base, "kustomization.yaml"))[0]
    return [doc for name in kustomization["resources"] for doc in load(os.path.join(base, name))]


def apply_json_patch(doc, ops):
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
        target = doc
        for p in parts[:-1]:
            target = target[p]
        assert op["op"] in ("replace", "add"), op
        if op["op"] == "replace":
            assert parts[-1] in target if isinstance(target, dict) else parts[-1] < len(target), op["path"]
        target[parts[-1]] = op["value"]
    return doc


def validate(doc):
    if doc["kind"] not in CUSTOM_KINDS:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def rendered():
    """The base, and each overlay's Deployment with its patches applied."""
    objects = base_objects()
    out = {"base": objects}
    overlays = os.path.join(DEPLOY, "k8s", "overlays")
    for name in sorted(os.listdir(overlays)):
        k = load(os.path.join(overlays, name, "kustomization.yaml"))[0]
        assert k["resources"] == ["../../base"], name
        docs = copy.deepcopy(objects)
        for patch in k.get("patches", []):
            ops = load(os.path.join(overlays, name, patch["path"]))[0]
            target = patch["target"]
            docs = [apply_json_patch(d, ops) if (d["kind"], d["metadata"]["name"]) == (target["kind"], target["name"]) else d
                    for d in docs]
        out[name] = docs
    return out


def test_manifests_validate_and_follow_the_rules():
    for name, docs in rendered().items():
        kinds = {d["kind"] for d in docs}
        assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PodMonitor",
                "PersistentVolumeClaim", "Job", "ConfigMap"} <= kinds, (name, kinds)
        for d in docs:
            validate(d)
        dep = next(d for d in docs if d["kind"] == "Deployment")
        pod = dep["spec"]["template"]
        c = pod["spec"]["containers"][0]
        args = c["args"]
        drain = int(args[args.index("--drain-timeout") + 1])
        assert pod["spec"]["terminationGracePeriodSeconds"] > drain + 5, name
        assert c["readinessProbe"]["httpGet"]["path"] == "/health" and "livenessProbe" in c and "startupProbe" in c
        assert c["lifecycle"]["preStop"]
        assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"], "memory is not overcommitted"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert not c["image"].endswith(":latest") and ":" in c["image"]
        key = next(e for e in c["env"] if e["name"] == "XGEN_API_KEY")
        assert key["valueFrom"]["secretKeyRef"]["name"]
        claim = next(v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v)["persistentVolumeClaim"]["claimName"]
        assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim for d in docs)
        # The disk prompt cache: a writable mount from a claim larger than its budget.
        cache_dir = args[args.index("--cache-dir") + 1]
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == cache_dir)
        assert not mount.get("readOnly")
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
        cache_claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim"
                           and d["metadata"]["name"] == volume["persistentVolumeClaim"]["claimName"])
        size = int(cache_claim["spec"]["resources"]["requests"]["storage"].removesuffix("Gi"))
        assert int(args[args.index("--cache-disk-budget") + 1].removesuffix("G")) < size, name
        labels = pod["metadata"]["labels"]
        for d in docs:
            sel = d.get("spec", {}).get("selector")
            if d["kind"] in ("Service",):
                assert sel.items() <= labels.items(), d["kind"]
            elif d["kind"] in ("PodDisruptionBudget", "PodMonitor"):
                assert sel["matchLabels"].items() <= labels.items(), d["kind"]
        monitor = next(d for d in docs if d["kind"] == "PodMonitor")
        ports = {p["name"] for p in c["ports"]}
        assert all(e["port"] in ports and e["path"] == "/metrics" for e in monitor["spec"]["podMetricsEndpoints"])
        hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
        metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
        rules = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["rules.yaml"])
        assert any(r["name"]["as"] == metric for r in rules["rules"])
        # The memory asked for covers the weights the overlay's format loads plus the KV budget.
        dtype = args[args.index("--dtype") + 1]
        mem = int(c["resources"]["limits"]["memory"].removesuffix("Gi"))
        kv = int(args[args.index("--kv-budget") + 1].removesuffix("G"))
        weights = {"bf16": 13.8, "q8_0": 7.9, "q4_0": 4.6}[dtype] / 1.073741824  # GB -> GiB
        assert weights + kv + 1 <= mem <= weights + kv + 3, (name, dtype, mem)


def test_the_dockerfile_builds_as_the_readme_says():
    docker = open(os.path.join(DEPLOY, "Dockerfile")).read()
    readme = open(os.path.join(ROOT, "README.md")).read()
    builds = re.findall(r"^RUN (cargo build[^\n]*)", docker, re.M)
    assert builds and all(b in readme for b in builds), builds
    assert re.search(r"^USER (?!root|0\b)", docker, re.M)
    assert "HEALTHCHECK" in docker and "/health" in docker and "HF_HOME" in docker and "VOLUME" in docker
    assert re.search(r'ENTRYPOINT \["xgen", "serve", "--host", "0.0.0.0"', docker)


def ask(base, session):
    body = json.dumps({"prompt": "Hi", "max_tokens": 2, "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body,
                                 headers={"content-type": "application/json", "x-session-id": session})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        return r.headers["x-xgen-replica"]


def test_sessions_stick_to_a_replica_and_move_when_it_stops():
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    (proc_a, base_a), (proc_b, base_b) = (start_xgen("--replica-id", name, "--drain-timeout", "1") for name in "ab")
    procs = [proc_a, proc_b]
    ports = [base_a.rsplit(":", 1)[1], base_b.rsplit(":", 1)[1]]
    front = free_port()
    work = tempfile.mkdtemp()
    conf = open(os.path.join(DEPLOY, "nginx", "xgen.conf")).read()
    conf = conf.replace("127.0.0.1:8081", f"127.0.0.1:{ports[0]}").replace("127.0.0.1:8082", f"127.0.0.1:{ports[1]}")
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{front};")
    with open(os.path.join(work, "xgen.conf"), "w") as f:
        f.write(conf)
    with open(os.path.join(work, "nginx.conf"), "w") as f:
        f.write(f"""pid {work}/nginx.pid;
error_log {work}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    include {work}/xgen.conf;
}}
""")
    proxy = subprocess.Popen([nginx, "-p", work, "-c", f"{work}/nginx.conf", "-g", "daemon off;"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{front}"
    try:
        wait_healthy(base, proxy)
        sessions = [f"conversation-{i}" for i in range(24)]
        where = {s: ask(base, s) for s in sessions}
        assert set(where.values()) == {"a", "b"}, "sessions spread over both replicas"
        for s in sessions:
            assert ask(base, s) == where[s], "a session stays on its replica"
        # Replica a stops: its sessions move to b, the others stay; no request fails.
        procs[0].terminate()
        procs[0].wait(timeout=30)
        for s in sessions:
            assert ask(base, s) == "b"
    finally:
        proxy.terminate()
        for p in procs:
            p.terminate()
        proxy.wait(timeout=10)
        for p in procs:
            p.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
