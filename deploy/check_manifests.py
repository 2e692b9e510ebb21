#!/usr/bin/env python3
"""What the deployment files promise, checked on the files themselves (the
schema validators say a file is well formed; this says it does what
deploy/README.md claims). Run by .ci/deploy-checks:

    deploy/check_manifests.py compose RESOLVED.yaml   # `docker-compose config` output
    deploy/check_manifests.py kubernetes              # deploy/kubernetes/**/*.yaml
"""

import pathlib
import re
import sys

import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
problems = []


def expect(ok, message):
    if not ok:
        problems.append(message)


SECRETISH = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY$", re.I)


def check_compose(path):
    doc = yaml.safe_load(pathlib.Path(path).read_text())
    services = doc["services"]
    expect({"postgres", "ingest", "ingest-sqlite", "device-sim", "prometheus", "grafana"} <= services.keys(),
           "compose: missing services")
    pg = services["postgres"]
    expect("healthcheck" in pg and "pg_isready" in " ".join(pg["healthcheck"]["test"]),
           "compose: postgres has no pg_isready healthcheck")
    dep = services["ingest"].get("depends_on", {})
    expect(isinstance(dep, dict) and dep.get("postgres", {}).get("condition") == "service_healthy",
           "compose: ingest does not wait for a healthy postgres")
    expect(not services["ingest"].get("profiles") and not pg.get("profiles"),
           "compose: the PostgreSQL pair must run without a profile")
    for name, profile in (("ingest-sqlite", "sqlite"), ("device-sim", "fleet"),
                          ("prometheus", "observability"), ("grafana", "observability")):
        expect(services[name].get("profiles") == [profile], f"compose: {name} is not in profile {profile}")
    expect("INGEST_DATABASE_URL" not in (services["ingest-sqlite"].get("environment") or {}),
           "compose: ingest-sqlite must not use PostgreSQL")
    # Secrets come from files; no environment value carries one.
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRETISH.search(key) and not key.endswith("_FILE") and not str(value).startswith("/run/secrets/"):
                problems.append(f"compose: {name}: {key} holds a value, not a /run/secrets path")
            if key == "INGEST_DATABASE_URL" and re.search(r"://[^/@]*:[^/@]*@", str(value)):
                problems.append(f"compose: {name}: a password in INGEST_DATABASE_URL")
    for name in ("ingest", "ingest-sqlite"):
        svc = services[name]
        env = svc.get("environment") or {}
        mounted = {s["source"] if isinstance(s, dict) else s for s in svc.get("secrets", [])}
        expect({"ops_token", "tls_cert", "tls_key"} <= mounted, f"compose: {name} lacks the ops token or TLS secrets")
        expect(env.get("INGEST_OPS_TOKEN_FILE") == "/run/secrets/ops_token", f"compose: {name}: ops token not from its secret")
        expect(env.get("INGEST_TLS_CERT") == "/run/secrets/tls_cert" and env.get("INGEST_TLS_KEY") == "/run/secrets/tls_key",
               f"compose: {name}: TLS files not from secrets")
        expect(svc.get("read_only") is True and "ALL" in svc.get("cap_drop", []), f"compose: {name} is not read-only without capabilities")
        expect(any(str(v).endswith(":/data") or ":/data:" in str(v) or (isinstance(v, dict) and v.get("target") == "/data")
                   for v in svc.get("volumes", [])), f"compose: {name} has no /data volume")
    for sname, spec in doc.get("secrets", {}).items():
        expect("file" in spec and "/secrets/" in spec["file"], f"compose: secret {sname} is not a file under deploy/secrets")
    mounts = " ".join(str(v) for v in services["prometheus"].get("volumes", []) + services["grafana"].get("volumes", []))
    for part in ("deploy/prometheus:/etc/prometheus", "deploy/grafana/provisioning:/etc/grafana/provisioning",
                 "deploy/grafana/dashboards:"):
        expect(part in mounts, f"compose: {part} is not mounted")


def containers(spec):
    return spec.get("initContainers", []) + spec["containers"]


def check_kubernetes():
    docs = []
    for path in sorted((DEPLOY / "kubernetes").rglob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = {}
    for name, d in docs:
        kinds.setdefault(d["kind"], []).append(d)
    for kind in ("Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap"):
        expect(kind in kinds, f"kubernetes: no {kind}")
    # Every Service is headless: a ClusterIP would pin a client's HTTP/2
    # connection, and all its streams, to one pod.
    services = {s["metadata"]["name"]: s for s in kinds["Service"]}
    for sname, svc in services.items():
        expect(svc["spec"].get("clusterIP") == "None", f"kubernetes: Service {sname} is not headless")
    sts = kinds["StatefulSet"][0]
    expect(sts["spec"].get("volumeClaimTemplates"), "kubernetes: the StatefulSet has no volume claim")
    expect(sts["spec"]["serviceName"] in services, "kubernetes: StatefulSet serviceName is not the headless Service")
    pg_pods = kinds["Deployment"][0]["spec"]["template"]["metadata"]["labels"]
    expect(any(s["metadata"]["name"] == "ingest-headless"
               and s["spec"]["selector"].items() <= pg_pods.items()
               and s["spec"]["selector"].get("app.kubernetes.io/variant") == "postgres"
               for s in services.values()),
           "kubernetes: no headless Service ingest-headless selecting the PostgreSQL pods only")
    config = kinds["ConfigMap"][0]["data"]
    expect(config.get("INGEST_ADMIN_LISTEN", "").endswith(":9464"), "kubernetes: admin listener not on 9464")
    for workload in kinds["Deployment"] + kinds["StatefulSet"]:
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        pod = workload["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        expect(psc.get("runAsNonRoot") is True, f"{name}: runAsNonRoot")
        expect(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccompProfile")
        expect(pod.get("terminationGracePeriodSeconds", 30) > 30, f"{name}: terminationGracePeriodSeconds must exceed INGEST_SHUTDOWN_GRACE (30s)")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        expect(volumes.get("tls", {}).get("secret", {}).get("secretName"), f"{name}: TLS is not from a Secret")
        for c in containers(pod):
            sc = c.get("securityContext", {})
            expect(sc.get("readOnlyRootFilesystem") is True, f"{name}/{c['name']}: readOnlyRootFilesystem")
            expect(sc.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}: allowPrivilegeEscalation")
            expect(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{c['name']}: drop ALL capabilities")
            res = c.get("resources", {})
            expect(res.get("requests") and res.get("limits", {}).get("memory"), f"{name}/{c['name']}: requests and a memory limit")
            for m in c.get("volumeMounts", []):
                # subPath mounts never see a Secret's updates: no live reload.
                expect(not (m["name"] in ("tls", "ops-tokens") and "subPath" in m), f"{name}/{c['name']}: {m['name']} mounted with subPath")
        main = next(c for c in pod["containers"] if c["name"] == "ingest")
        expect(main.get("livenessProbe", {}).get("httpGet") == {"path": "/healthz", "port": "admin"}, f"{name}: liveness is not GET /healthz on admin")
        expect(main.get("readinessProbe", {}).get("httpGet") == {"path": "/readyz", "port": "admin"}, f"{name}: readiness is not GET /readyz on admin")
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        expect(ports == {"grpc": 50051, "admin": 9464}, f"{name}: ports")
        expect(any(m["name"] == "tls" and m["mountPath"] == "/etc/ingest/tls" for m in main["volumeMounts"]), f"{name}: TLS not mounted at /etc/ingest/tls")
        env_names = {e["name"] for e in main.get("env", [])}
        if workload["kind"] == "Deployment":
            db = next((e for e in main.get("env", []) if e["name"] == "INGEST_DATABASE_URL"), None)
            expect(db and "secretKeyRef" in db.get("valueFrom", {}), f"{name}: INGEST_DATABASE_URL not from a Secret")
        else:
            expect("INGEST_DATABASE_URL" not in env_names, f"{name}: the SQLite variant must not set INGEST_DATABASE_URL")
            mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
            expect(mounts.get("data") == "/data", f"{name}: the volume claim is not mounted at /data")


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "compose" and len(sys.argv) == 3:
        check_compose(sys.argv[2])
    elif what == "kubernetes":
        check_kubernetes()
    else:
        sys.exit(__doc__)
    for p in problems:
        print(f"  FAIL: {p}")
    if problems:
        sys.exit(1)
    print(f"  {what}: every promise of deploy/README.md holds")


if __name__ == "__main__":
    main()
