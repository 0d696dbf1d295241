#!/usr/bin/env python3
"""Offline checks of deploy/: the compose file as docker-compose resolves it, and the Kubernetes
manifests in deploy/k8s. Run by tests/tests/deploy.rs (with .deps/venv/bin/python, which has PyYAML):

    .deps/venv/bin/python deploy/check.py

What it checks (and what it cannot: no cluster, no KEDA, no image registry here):
- compose (`docker-compose config`, when docker-compose is installed): media and model volumes resolve
  to the repository root's media/ and the named `models` volume (or HEIMDEX_MODELS's folder); one-shot
  `migrate` and `models` services that the workers wait for (service_completed_successfully) along with healthy
  RabbitMQ, PostgreSQL and Redis; every published infrastructure port bound to 127.0.0.1; each worker's
  CPU limit equal to its ONNX Runtime threads; a stop grace period above the drain timeout; JSON logs.
- k8s: every file parses; each worker Deployment has startupProbe and readinessProbe on /readyz and a
  livenessProbe on /healthz at the health port, terminationGracePeriodSeconds above
  HEIMDEX__WORKER__SHUTDOWN_TIMEOUT_MS, which is at least the task time limit (a minute below
  HEIMDEX__AMQP__CONSUMER_TIMEOUT_MS), so a busy pod scaled down drains instead of being killed; JSON
  logs, CPU requests = limits = HEIMDEX__ENGINE__INTRA_THREADS, memory requests <= limits, read-only
  models; one KEDA ScaledObject per Deployment on its queue with mode QueueLength over the management
  API (protocol http, unacknowledged messages counted: ready + in flight) and value =
  HEIMDEX__WORKER__CONCURRENCY, authenticated by a TriggerAuthentication whose http(s) URL is in an
  example Secret that no worker reads, trigger metadata all strings (as KEDA's CRD requires);
  a Job runs `heimdex migrate` with the owner's URL from a Secret no worker reads and grants the worker role, a Job
  downloads the models; a CronJob runs the retention sweep (`heimdex sweep`, retention.days set);
  kustomization.yaml lists files that exist. With
  `kubernetes-validate` installed, the built-in kinds are also validated against Kubernetes' OpenAPI
  schemas (the KEDA kinds cannot be: their CRD schemas are not available offline).
Prints one line per check group and exits 1 on the first failure.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
K8S = DEPLOY / "k8s"
DEFAULT_DRAIN_MS = 30_000  # WorkerSettings::shutdown_timeout_ms default (shared/src/config.rs)
DEFAULT_TASK_TIMEOUT_MS = 300_000  # WorkerSettings::task_timeout_ms default
DEFAULT_CONSUMER_TIMEOUT_MS = 1_800_000  # AmqpSettings::consumer_timeout_ms default (RabbitMQ's)


def task_time_limit_ms(env):
    """The longest a task may run: WorkerSettings::task_timeout's cap, a minute below the broker's
    consumer timeout (or the base bound, if that is longer)."""
    consumer = int(env.get("HEIMDEX__AMQP__CONSUMER_TIMEOUT_MS", DEFAULT_CONSUMER_TIMEOUT_MS))
    base = int(env.get("HEIMDEX__WORKER__TASK_TIMEOUT_MS", DEFAULT_TASK_TIMEOUT_MS))
    return max(consumer - 60_000, base)


def fail(message):
    print(f"check: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def expect(condition, message):
    if not condition:
        fail(message)


def seconds(text):
    """'45s', '1m30s', '3m' -> seconds."""
    total, number = 0.0, ""
    for c in str(text):
        if c.isdigit() or c == ".":
            number += c
        else:
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[c]
            number = ""
    return total + (float(number) if number else 0.0)


def compose_config(extra_env=None, overlays=()):
    env = dict(os.environ, **(extra_env or {}))
    for key in [k for k in env if k.startswith("HEIMDEX_") and not k.startswith("HEIMDEX__") and k not in (extra_env or {})]:
        del env[key]  # the file's defaults, not the caller's
    files = [arg for f in ("docker-compose.yml", *overlays) for arg in ("-f", str(DEPLOY / f))]
    out = subprocess.run(["docker-compose", *files, "config"], cwd=ROOT, env=env, capture_output=True, text=True)
    expect(out.returncode == 0, f"docker-compose config failed: {out.stderr}")
    return yaml.safe_load(out.stdout)


def one_broker_setting(env, where):
    """amqp.url and amqp.urls together are a configuration error the worker refuses at start (an
    overlay that sets one over a file that sets the other stops every container)."""
    both = {"HEIMDEX__AMQP__URL", "HEIMDEX__AMQP__URLS"} <= env.keys()
    expect(not both, f"{where}: sets both HEIMDEX__AMQP__URL and HEIMDEX__AMQP__URLS; the worker refuses that")


def check_compose():
    if shutil.which("docker-compose") is None:
        print("check: compose: SKIPPED (docker-compose is not installed; scripts/setup installs it)")
        return
    config = compose_config()
    services = config["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    expect(set(workers) == {"worker-index", "worker-vision"}, f"worker services: {sorted(workers)}")
    models = services.get("models")
    expect(models is not None and models.get("restart") == "no", "a one-shot `models` service")
    expect(models["command"][0] == "heimdex-models" and models["command"][-2:] == ["--dir", "/models"], f"models command {models['command']}")
    expect("models:/models:rw" in models["volumes"], f"models writes the named volume: {models['volumes']}")
    expect("models" in config.get("volumes", {}), "a named `models` volume")
    migrate = services.get("migrate")
    expect(migrate is not None and migrate["command"] == ["heimdex", "migrate"] and migrate.get("restart") == "no", "a one-shot `migrate` service")
    expect(migrate["depends_on"].get("postgres", {}).get("condition") == "service_healthy", "migrate waits for a healthy postgres")
    for name, worker in workers.items():
        deps = worker.get("depends_on", {})
        for once in ("models", "migrate"):
            expect(deps.get(once, {}).get("condition") == "service_completed_successfully", f"{name} waits for {once}: {deps}")
        for infra in ("rabbitmq", "postgres", "redis"):
            expect(deps.get(infra, {}).get("condition") == "service_healthy", f"{name} waits for a healthy {infra}")
            expect("healthcheck" in services[infra], f"{infra} has a healthcheck")
        volumes = worker["volumes"]
        expect(f"{ROOT / 'media'}:/media:ro" in volumes, f"{name}: media is the repository root's media/: {volumes}")
        expect("models:/models:ro" in volumes, f"{name}: models from the named volume, read-only: {volumes}")
        env = worker["environment"]
        expect(float(worker["cpus"]) == float(env["HEIMDEX__ENGINE__INTRA_THREADS"]), f"{name}: cpus = ORT threads ({worker['cpus']} vs {env['HEIMDEX__ENGINE__INTRA_THREADS']})")
        expect(seconds(worker["stop_grace_period"]) * 1000 > DEFAULT_DRAIN_MS, f"{name}: stop_grace_period above the drain timeout")
        expect("/readyz" in " ".join(worker["healthcheck"]["test"]), f"{name}: healthcheck on /readyz")
        expect("ports" not in worker, f"{name} publishes no port (health stays inside; --scale would collide)")
        expect(env.get("HEIMDEX__LOG__FORMAT") == "json", f"{name}: JSON logs for the collector (HEIMDEX__LOG__FORMAT=json)")
    host = compose_config(overlays=["docker-compose.host.yml"])["services"]
    for name, service in [*services.items(), *((f"{n} (host overlay)", s) for n, s in host.items())]:
        one_broker_setting(service.get("environment") or {}, name)
    for name, service in services.items():
        for port in service.get("ports", []):
            expect(str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback")
    offline = compose_config({"HEIMDEX_MODELS": "../models", "HEIMDEX_MODELS_COMMAND": "verify"})
    expect(f"{ROOT / 'models'}:/models:ro" in offline["services"]["worker-vision"]["volumes"], "HEIMDEX_MODELS=../models mounts the root's models/")
    expect(offline["services"]["models"]["command"][1] == "verify", "HEIMDEX_MODELS_COMMAND=verify")
    print(f"check: compose: ok ({len(services)} services; volumes, depends_on, loopback ports, cpus = threads, offline models, "
          "one broker setting with the host overlay)")


def env_of(container, configmap):
    env = dict(configmap)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def quantity(text):
    """CPU or memory quantity -> float (cores, bytes)."""
    text = str(text)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)


def probe_path(container, probe):
    spec = container.get(probe)
    expect(spec is not None, f"{container['name']}: no {probe}")
    get = spec.get("httpGet", {})
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    port = get.get("port")
    expect(port in ports or port in ports.values(), f"{probe} port {port} is not a container port")
    return get.get("path")


def check_api(deployment, by_kind):
    """The HTTP API (serve.yaml): `heimdex serve` with its keys from a Secret only it reads, probed on
    /readyz and /healthz, non-root, behind a Service."""
    expect(deployment is not None, "the API Deployment heimdex-api (serve.yaml)")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    expect(container["command"][:2] == ["heimdex", "serve"], f"heimdex-api: runs {container['command']}")
    refs = [(s.get("secretRef") or {}).get("name") for s in container.get("envFrom", [])]
    expect("heimdex-api" in refs, "heimdex-api: API keys from the Secret heimdex-api")
    api_secret = by_kind.get("Secret", {}).get("heimdex-api", {}).get("stringData", {})
    expect("HEIMDEX__SERVE__API_KEYS" in api_secret, "the Secret heimdex-api defines HEIMDEX__SERVE__API_KEYS")
    expect(probe_path(container, "readinessProbe") == "/readyz", "heimdex-api: readinessProbe on /readyz")
    expect(probe_path(container, "livenessProbe") == "/healthz", "heimdex-api: livenessProbe on /healthz")
    expect(pod["securityContext"].get("runAsNonRoot") is True, "heimdex-api: runs as non-root")
    services = [s for s in by_kind.get("Service", {}).values() if s["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()]
    expect(len(services) == 1, "heimdex-api: one Service selects it")
    print("check: api: ok (heimdex serve, keys from heimdex-api, /readyz and /healthz probes, a Service)")


def check_k8s():
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        docs[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    kustomization = docs.pop("kustomization.yaml")[0]
    for resource in kustomization["resources"]:
        expect((K8S / resource).is_file(), f"kustomization lists {resource}, which does not exist")
    objects = [d for ds in docs.values() for d in ds]
    by_kind = {}
    for o in objects:
        expect(o.get("apiVersion") and o.get("kind") and o.get("metadata", {}).get("name"), f"apiVersion, kind, metadata.name: {o}")
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    configmap = by_kind["ConfigMap"]["heimdex"]["data"]
    deployments = dict(by_kind.get("Deployment", {}))
    check_api(deployments.pop("heimdex-api", None), by_kind)
    secrets = {name: secret.get("stringData", {}) for name, secret in by_kind["Secret"].items()}
    expect(set(deployments) == {"worker-index", "worker-vision"}, f"deployments: {sorted(deployments)}")
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in by_kind.get("ScaledObject", {}).values()}
    auths = by_kind.get("TriggerAuthentication", {})
    prefix = configmap["HEIMDEX__AMQP__PREFIX"]
    for name, deployment in deployments.items():
        spec = deployment["spec"]
        pod = spec["template"]["spec"]
        expect(spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items(), f"{name}: selector matches the pod labels")
        (container,) = pod["containers"]
        env = env_of(container, configmap)
        expect(container["command"] == [name], f"{name}: runs {container['command']}")
        one_broker_setting({**env, **secrets.get("heimdex", {})}, name)
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef")
            expect(ref["name"] == "heimdex", f"{name}: envFrom {ref}")
        expect(probe_path(container, "startupProbe") == "/readyz", f"{name}: startupProbe on /readyz")
        expect(probe_path(container, "readinessProbe") == "/readyz", f"{name}: readinessProbe on /readyz")
        expect(probe_path(container, "livenessProbe") == "/healthz", f"{name}: livenessProbe on /healthz")
        health_port = int(env["HEIMDEX__WORKER__HEALTH_ADDR"].rsplit(":", 1)[1])
        expect(health_port in [p["containerPort"] for p in container["ports"]], f"{name}: health port {health_port} exposed")
        expect(env.get("HEIMDEX__LOG__FORMAT") == "json", f"{name}: JSON logs for the collector (HEIMDEX__LOG__FORMAT=json)")
        drain_ms = int(env.get("HEIMDEX__WORKER__SHUTDOWN_TIMEOUT_MS", DEFAULT_DRAIN_MS))
        grace = pod["terminationGracePeriodSeconds"]
        expect(grace * 1000 > drain_ms, f"{name}: terminationGracePeriodSeconds {grace} s not above the drain timeout {drain_ms} ms")
        # A pod scaled down while busy drains: its tasks in flight may run up to the task time limit.
        limit_ms = task_time_limit_ms(env)
        expect(drain_ms >= limit_ms, f"{name}: drain timeout {drain_ms} ms below the task time limit {limit_ms} ms: a scale-down would cut tasks off")
        threads = int(env["HEIMDEX__ENGINE__INTRA_THREADS"])
        resources = container["resources"]
        expect(quantity(resources["requests"]["cpu"]) == threads == quantity(resources["limits"]["cpu"]),
               f"{name}: cpu requests/limits {resources} vs {threads} ORT threads")
        expect(quantity(resources["requests"]["memory"]) <= quantity(resources["limits"]["memory"]), f"{name}: memory requests above limits")
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        expect(mounts.get(configmap["HEIMDEX__MODELS__DIR"], {}).get("readOnly") is True, f"{name}: models mounted read-only")
        expect(configmap["HEIMDEX__MEDIA__ROOT"] in mounts, f"{name}: media root mounted")
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        for mount in mounts.values():
            expect(mount["name"] in claims, f"{name}: volume {mount['name']} is defined")
        for claim in filter(None, claims.values()):
            expect(claim in by_kind.get("PersistentVolumeClaim", {}), f"{name}: claim {claim} exists")
        so = scaled.get(name)
        expect(so is not None, f"no ScaledObject for {name}")
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        kind = name.removeprefix("worker-")
        expect(trigger["type"] == "rabbitmq" and meta["mode"] == "QueueLength", f"{name}: rabbitmq trigger, mode QueueLength: {trigger}")
        # Over AMQP KEDA sees only ready messages; the management API (http) counts ready + unacked,
        # so the tasks in flight keep their workers.
        expect(meta.get("protocol") == "http", f"{name}: the trigger must read the management API (protocol: http), not AMQP: {meta}")
        expect(meta.get("excludeUnacknowledged", "false") == "false", f"{name}: unacknowledged messages (tasks in flight) must count: {meta}")
        expect(all(isinstance(v, str) for v in meta.values()), f"{name}: KEDA trigger metadata values must be strings: {meta}")
        expect(meta["queueName"] == f"{prefix}.{kind}", f"{name}: scales on {meta['queueName']}, not {prefix}.{kind}")
        expect(int(meta["value"]) == int(env["HEIMDEX__WORKER__CONCURRENCY"]), f"{name}: value {meta['value']} != concurrency {env['HEIMDEX__WORKER__CONCURRENCY']}")
        expect(so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"], f"{name}: replica bounds")
        auth = auths.get(trigger["authenticationRef"]["name"])
        expect(auth is not None, f"{name}: TriggerAuthentication {trigger['authenticationRef']} exists")
        worker_secrets = {(s.get("secretRef") or {}).get("name") for s in container.get("envFrom", [])}
        for ref in auth["spec"]["secretTargetRef"]:
            expect(ref["key"] in secrets.get(ref["name"], {}), f"TriggerAuthentication reads {ref}, which the example Secrets lack")
            expect(ref["name"] not in worker_secrets, f"{name}: the management URL is in {ref['name']}, a Secret the workers read")
            if ref["parameter"] == "host":
                expect(secrets[ref["name"]][ref["key"]].startswith(("http://", "https://")), f"KEDA's host must be the management API's http(s) URL: {ref}")
    expect(not any(k.endswith("MIGRATE_ON_START") for k in configmap), "workers no longer migrate (database.migrate_on_start is gone)")
    jobs = {o["metadata"]["name"]: o["spec"]["template"]["spec"]["containers"][0] for o in by_kind.get("Job", {}).values()}
    migrate = [c for c in jobs.values() if c["command"] == ["heimdex", "migrate"]]
    expect(len(migrate) == 1, f"one Job runs `heimdex migrate`: {sorted(jobs)}")
    owner = [e for e in migrate[0].get("env", []) if e["name"] == "HEIMDEX__DATABASE__URL"]
    ref = owner[0]["valueFrom"]["secretKeyRef"] if owner else {}
    owner_secret = by_kind["Secret"].get(ref.get("name"), {}).get("stringData", {})
    expect(ref.get("name") != "heimdex" and ref.get("key") in owner_secret, f"the migrate Job reads the owner's URL from its own Secret: {ref}")
    expect(configmap.get("HEIMDEX__DATABASE__WORKER_ROLE"), "the migrate Job grants a worker role")
    expect(any(c["command"][:2] == ["heimdex-models", "download"] for c in jobs.values()), "a Job downloads the models")
    crons = [o["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0] for o in by_kind.get("CronJob", {}).values()]
    expect(any(c["command"] == ["heimdex", "sweep"] and int(env_of(c, configmap).get("HEIMDEX__RETENTION__DAYS", "0")) > 0 for c in crons),
           "a CronJob runs `heimdex sweep` with HEIMDEX__RETENTION__DAYS set")
    print(f"check: k8s: ok ({len(objects)} objects: probes, drain = task time limit < grace period, cpu = threads, "
          "KEDA on ready + unacked with value = concurrency, references)")
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        print("check: k8s schemas: SKIPPED (pip install kubernetes-validate to validate against Kubernetes' OpenAPI schemas)")
        return
    builtin = [o for o in objects if "." not in o["apiVersion"].split("/")[0] or o["apiVersion"].startswith(("apps/", "batch/"))]
    version = os.environ.get("HEIMDEX_K8S_VERSION", "1.30.0")
    for o in builtin:
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"{o['kind']} {o['metadata']['name']} against Kubernetes {version}: {e.message} at {list(e.path)}")
    print(f"check: k8s schemas: ok ({len(builtin)} built-in objects against Kubernetes {version}, strict; KEDA kinds not schema-checked)")


if __name__ == "__main__":
    check_compose()
    check_k8s()
