"""The container deployment (docker/, .dockerignore, docs/DEPLOYMENT.md), checked without a Docker daemon.

What is checked here: the Compose files parse (PyYAML, with Compose's ${VAR:-default} interpolation
done here) and, when `docker-compose` is installed, validate with `docker-compose config -q`; each
osteoscreen service's command and health check parse with the real CLI parser; each service's
OSTEOSCREEN_* environment (with the mounted config.yaml) loads with `osteoscreen.config.load`; the
roles share the storage volume at one path; the demo Orthanc's modality points at the listener and
its Lua route is the script tests/test_orthanc.py runs (and, when Orthanc is installed, Orthanc starts
with the demo configuration); the Dockerfile's instructions (base image, torch variant index, user,
ports, entrypoint, what it copies and where the shipped models end up) and the .dockerignore.

What is not checked here: that the image builds or the containers run (no Docker daemon).
"""
from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from osteoscreen import config as config_module
from osteoscreen.cli import build_parser
from osteoscreen.config import ConfigError, Destination, load
from osteoscreen.pipeline import localize_net

from .conftest import require_tool

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ORTHANC_CONFIG = DOCKER / "orthanc" / "orthanc.json"
DEPLOYMENT_DOC = REPO / "docs" / "DEPLOYMENT.md"

ROLES = {"listener": "listen", "worker": "work", "dispatcher": "dispatch", "web": "web"}  # service -> command
SERVICES = {"postgres", "orthanc", *ROLES}
# What docker/.env holds in a real deployment: the only variable without a default.
COMPOSE_ENV = {"POSTGRES_PASSWORD": "0123456789abcdef"}


# -- Compose files, read the way Compose reads them -------------------------------------------------------
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ${VAR}, $VAR, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    ${VAR?error}, and $$ for a literal $."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        if op in (":-", ":?"):
            present = bool(env.get(name))
        else:
            present = name in env
        if op in (":-", "-"):
            return env[name] if present else arg
        if op in (":?", "?") and not present:
            raise ValueError(f"required variable {name}: {arg}")
        return env.get(name, "")

    return _VARIABLE.sub(substitute, value)


def merge(base: dict, override: dict) -> dict:
    """Compose's merge of an override file, for the mappings these files use."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def compose(*files: Path, env: dict[str, str] | None = None) -> dict:
    """The merged, interpolated Compose model (YAML anchors and `<<` merge keys resolved by PyYAML)."""
    model: dict = {}
    for path in files or (COMPOSE,):
        data = yaml.safe_load(path.read_text())
        assert isinstance(data, dict), path
        model = merge(model, interpolate(data, COMPOSE_ENV if env is None else env))
    return {k: v for k, v in model.items() if not k.startswith("x-")}


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume entry."""
    out = []
    for entry in service.get("volumes", []):
        parts = entry.split(":")
        out.append((parts[0], parts[1]))
    return out


def host_path(service: dict, container_path: str) -> Path | None:
    """The host file behind a container path, through the service's bind mounts (relative to docker/)."""
    for source, target in mounts(service):
        if not source.startswith((".", "/")):
            continue  # a named volume
        target = target.rstrip("/")
        if container_path == target or container_path.startswith(target + "/"):
            return (DOCKER / source / container_path[len(target):].lstrip("/")).resolve()
    return None


def parse_command(argv: list[str]):
    """argv through the real CLI parser; a sub-command the CLI lacks fails with a clear message."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`osteoscreen {shlex.join(argv)}` does not parse with osteoscreen.cli.build_parser() "
                    f"(exit {exc.code}): does osteoscreen have the `{argv[0]}` sub-command with these options?")


def settings_of(service: dict):
    """Settings the service's process gets: its --config file (through the bind mount) and environment."""
    args = parse_command(service["command"])
    config_file = host_path(service, args.config) if getattr(args, "config", None) else None
    if getattr(args, "config", None):
        assert config_file is not None and config_file.is_file(), \
            f"--config {args.config} is not a file mounted from the repository ({config_file})"
    env = {k: v for k, v in environment(service).items() if k.startswith("OSTEOSCREEN_")}
    return load(config_file, environ=env)


@pytest.fixture(scope="module")
def model() -> dict:
    return compose(COMPOSE)


@pytest.fixture(scope="module")
def gpu_model() -> dict:
    return compose(COMPOSE, COMPOSE_GPU)


def test_compose_file_has_the_services(model):
    assert set(model["services"]) == SERVICES
    assert {"spool", "pgdata"} <= set(model["volumes"])


def test_docker_compose_validates_the_files(tmp_path):
    """`docker-compose config -q` needs no daemon; it reads the files as Compose will."""
    binary = require_tool("docker-compose")
    env_file = tmp_path / "empty.env"  # not the developer's docker/.env
    env_file.write_text("")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "OSTEOSCREEN_", "TORCH_"))}

    def config(*files: Path, env: dict[str, str]):
        args = [binary, "--env-file", str(env_file)] + [a for f in files for a in ("-f", str(f))] + ["config", "-q"]
        return subprocess.run(args, capture_output=True, text=True, timeout=120, env={**base, **env}, cwd=REPO)

    for files in ((COMPOSE,), (COMPOSE, COMPOSE_GPU)):
        out = config(*files, env=COMPOSE_ENV)
        assert out.returncode == 0, f"{[f.name for f in files]}: {out.stdout}{out.stderr}"
    refused = config(COMPOSE, env={})
    assert refused.returncode != 0 and "POSTGRES_PASSWORD" in refused.stderr, refused.stderr


def test_postgres_has_a_health_check_and_the_password_from_the_environment(model):
    pg = model["services"]["postgres"]
    env = environment(pg)
    assert pg["image"].startswith("postgres:16")
    assert env["POSTGRES_PASSWORD"] == COMPOSE_ENV["POSTGRES_PASSWORD"]
    test = pg["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "pg_isready" in test[1] and f"-U {env['POSTGRES_USER']}" in test[1]
    assert ("pgdata", "/var/lib/postgresql/data") in mounts(pg)
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        compose(COMPOSE, env={})  # no default password


@pytest.mark.parametrize("name", sorted(ROLES))
def test_each_role_service_runs_its_command(model, name):
    service = model["services"][name]
    args = parse_command(service["command"])
    assert args.command == ROLES[name]
    assert service["restart"] == "unless-stopped"
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / service["build"]["context"]).resolve() == REPO
    assert "container_name" not in service  # a fixed name would forbid --scale


@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.gpu.yaml")])
def test_every_role_loads_its_settings(files, model, gpu_model):
    """The environment and the mounted config.yaml load without ConfigError (no TLS file or other path
    that does not exist is referenced by default); all roles agree on database, storage and AE title."""
    services = (gpu_model if len(files) == 2 else model)["services"]
    seen = {}
    for name in ROLES:
        try:
            settings = settings_of(services[name])
            load(None, environ={k: v for k, v in environment(services[name]).items() if k.startswith("OSTEOSCREEN_")})
        except ConfigError as exc:
            pytest.fail(f"{name}: {exc}")
        seen[name] = settings
        assert settings.db_url.startswith("postgresql+psycopg://osteoscreen:")
        assert settings.db_url.endswith("@postgres:5432/osteoscreen")
        from sqlalchemy.engine import make_url
        make_url(settings.db_url).get_dialect()  # the psycopg driver the postgres extra installs
        assert settings.web.bind_address == "0.0.0.0"
        assert not settings.tls.enabled and settings.destinations
    assert len({(s.db_url, str(s.storage), s.ae_title, tuple(map(str, s.destinations))) for s in seen.values()}) == 1
    if len(files) == 2:
        assert seen["worker"].device == "cuda"
        assert all(s.device == "auto" for n, s in seen.items() if n != "worker")


def test_roles_share_the_storage_volume_at_one_path(model):
    targets = {}
    for name in ROLES:
        service = model["services"][name]
        spool = [target for source, target in mounts(service) if source == "spool"]
        assert len(spool) == 1, name
        targets[name] = spool[0]
        assert str(settings_of(service).storage) == spool[0], f"{name}: storage is not the mounted volume"
    assert set(targets.values()) == {"/var/lib/osteoscreen"}, targets


def test_health_checks_use_real_commands(model):
    for name, role in ROLES.items():
        service = model["services"][name]
        check = service["healthcheck"]
        test = check["test"]
        assert test[0] == "CMD", name
        if test[1] == "osteoscreen":
            args = parse_command(test[2:])
            assert args.command == "health" and args.role == role and args.this_host, (name, test)
            assert args.config == parse_command(service["command"]).config, "health must read the role's settings"
        else:  # the dashboard answers over HTTP
            assert name == "web" and test[1] == "python" and test[2] == "-c", test
            code = test[3]
            compile(code, "<healthcheck>", "exec")
            url = re.search(r"https?://[^'\"]+", code).group(0)
            port = settings_of(service).web.port
            assert url == f"http://127.0.0.1:{port}/healthz", url
        for key in ("interval", "timeout", "retries", "start_period"):
            assert key in check, (name, key)


def test_published_ports_match_the_settings(model):
    services = model["services"]
    listener, web = settings_of(services["listener"]), settings_of(services["web"])
    assert f"{listener.port}:{listener.port}" in services["listener"]["ports"]
    assert any(p.endswith(f":{web.web.port}") for p in services["web"]["ports"])
    assert "ports" not in services["worker"] and "ports" not in services["dispatcher"]


def test_workers_scale_out(model):
    worker = model["services"]["worker"]
    assert worker["deploy"]["replicas"] >= 2
    assert "--this-host" in worker["healthcheck"]["test"]  # each replica checks its own process


def test_gpu_override_builds_cuda_workers(model, gpu_model):
    worker, base = gpu_model["services"]["worker"], model["services"]["worker"]
    assert base["build"]["args"]["TORCH_VARIANT"] == dockerfile_args()["TORCH_VARIANT"] == "cpu"
    assert worker["build"]["args"]["TORCH_VARIANT"] == "cu128"
    assert worker["image"] != base["image"]  # the CPU roles keep the CPU image
    assert environment(worker)["OSTEOSCREEN_DEVICE"] == "cuda"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices and all("gpu" in d["capabilities"] for d in devices)
    assert worker["deploy"]["replicas"] == base["deploy"]["replicas"]
    for name in ("listener", "dispatcher", "web"):
        assert gpu_model["services"][name] == model["services"][name]


def test_demo_orthanc_routes_to_the_listener_and_runs_the_tested_lua_script(model):
    from bench.orthanc import ROUTE_LUA  # the script tests/test_orthanc.py runs in a real Orthanc

    services = model["services"]
    orthanc = services["orthanc"]
    config_mount = [(Path(s), t) for s, t in mounts(orthanc) if s.endswith(".json")]
    assert len(config_mount) == 1 and (DOCKER / config_mount[0][0]).resolve() == ORTHANC_CONFIG
    assert re.fullmatch(r"/etc/orthanc/[^/]+\.json", config_mount[0][1])  # the image merges /etc/orthanc/*.json
    config = json.loads(ORTHANC_CONFIG.read_text())

    listener = settings_of(services["listener"])
    aet, host, port = config["DicomModalities"]["osteoscreen"]
    assert (aet, host, port) == (listener.ae_title, "listener", listener.port)
    lua = config["LuaScripts"]
    assert len(lua) == 1 and host_path(orthanc, lua[0]) == ROUTE_LUA.resolve() and ROUTE_LUA.is_file()
    assert "SendToModality(instanceId, 'osteoscreen')" in ROUTE_LUA.read_text()

    # results go back to this Orthanc by default, and it accepts them
    destination = Destination.parse(environment(services["dispatcher"])["OSTEOSCREEN_DESTINATIONS"])
    assert (destination.ae_title, destination.host, destination.port) == (config["DicomAet"], "orthanc",
                                                                          config["DicomPort"])
    assert config["DicomAlwaysAllowStore"] is True and config["DicomCheckCalledAet"] is False
    assert {f"127.0.0.1:{config['DicomPort']}:{config['DicomPort']}",
            f"127.0.0.1:{config['HttpPort']}:{config['HttpPort']}"} <= set(orthanc["ports"])


def test_orthanc_starts_with_the_demo_configuration(tmp_path):
    """The demo PACS's JSON (paths and ports made local) is one this Orthanc accepts, Lua script included."""
    from bench.orthanc import Orthanc  # the start-up of tests/test_orthanc.py, here on the demo's settings
    from .test_orthanc import orthanc_binary

    config = json.loads(ORTHANC_CONFIG.read_text())
    orthanc = Orthanc(tmp_path, base=config, config={"RemoteAccessAllowed": False},
                      auth=next(iter(config["RegisteredUsers"].items())), binary=orthanc_binary())
    try:
        system = orthanc.get("/system")
        assert system["DicomAet"] == config["DicomAet"] and system["Name"] == config["Name"]
        assert orthanc.get("/modalities") == ["osteoscreen"]
    finally:
        orthanc.stop()


# -- Dockerfile and .dockerignore -----------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def of(keyword: str) -> list[str]:
    return [rest for k, rest in dockerfile() if k == keyword]


def key_values(text: str) -> dict[str, str]:
    """ARG/ENV/LABEL arguments in key=value form (values may be quoted)."""
    return dict(item.split("=", 1) for item in shlex.split(text))


def dockerfile_args() -> dict[str, str]:
    out = {}
    for text in of("ARG"):
        name, _, default = text.partition("=")
        out[name] = default.strip('"')
    return out


def dockerfile_env() -> dict[str, str]:
    env = {}
    for text in of("ENV"):
        env.update(key_values(text))
    return env


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps path (relative to the repository) out of the build context."""
    excluded = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = Path(path).parts
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        patterns = {pattern, pattern[3:]} if pattern.startswith("**/") else {pattern}
        hit = any(fnmatch.fnmatchcase(c, p) or (p != pattern and fnmatch.fnmatchcase(Path(c).name, p))
                  for c in candidates for p in patterns)
        if hit:
            excluded = not negate
    return excluded


def test_dockerfile_base_image_and_torch_variant():
    froms = of("FROM")
    assert froms and all(f.split()[0].startswith("python:3.11-slim") for f in froms), froms
    args = dockerfile_args()
    assert args["TORCH_VARIANT"] == "cpu"
    runs = of("RUN")
    torch = [i for i, r in enumerate(runs) if "download.pytorch.org/whl/${TORCH_VARIANT}" in r]
    assert torch, "torch is not installed from https://download.pytorch.org/whl/${TORCH_VARIANT}"
    assert re.search(r'--index-url\s+"?https://download\.pytorch\.org/whl/\$\{TORCH_VARIANT\}', runs[torch[0]])
    assert "torch" in runs[torch[0]].split("whl/${TORCH_VARIANT}", 1)[1]
    project = [i for i, r in enumerate(runs) if re.search(r'pip install[^&]*-e "\.\[postgres\]"', r)]
    assert project and torch[0] < project[0], "torch must come first, then the project with the postgres extra"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("psycopg") for d in extras["postgres"])


def test_dockerfile_runs_osteoscreen_unprivileged_on_the_right_ports():
    users = of("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    ports = {p.split("/")[0] for e in of("EXPOSE") for p in e.split()}
    assert {"11112", "8080"} <= ports
    assert json.loads(of("ENTRYPOINT")[-1]) == ["osteoscreen"]
    cmd = json.loads(of("CMD")[-1])
    assert parse_command(cmd).command == "serve"
    assert [json.loads(v) for v in of("VOLUME")] == [["/var/lib/osteoscreen"]]
    env = dockerfile_env()
    assert env["OSTEOSCREEN_STORAGE"] == "/var/lib/osteoscreen"
    settings = load(None, environ={k: v for k, v in env.items() if k.startswith("OSTEOSCREEN_")})
    assert settings.web.bind_address == "0.0.0.0" and settings.port == 11112 and settings.web.port == 8080


def test_dockerfile_labels():
    labels = {}
    for text in of("LABEL"):
        labels.update(key_values(text))
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.title"] == "osteoscreen"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.version"] == "${VERSION}" and dockerfile_args()["VERSION"] == version


def test_dockerfile_copies_existing_paths_and_the_models_land_where_the_code_looks():
    workdir, copied = "/", {}
    for keyword, rest in dockerfile():
        if keyword == "WORKDIR":
            workdir = rest if rest.startswith("/") else f"{workdir.rstrip('/')}/{rest}"
        elif keyword in ("COPY", "ADD"):
            assert keyword == "COPY", "ADD fetches and unpacks; COPY is enough"
            *sources, dest = [a for a in shlex.split(rest) if not a.startswith("--")]
            for source in sources:
                path = REPO / source
                assert path.exists(), f"COPY {source}: not in the repository"
                assert not dockerignore_excludes(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
                target = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
                if dest.endswith("/") and path.is_file():
                    target = f"{target.rstrip('/')}/{path.name}"
                copied[source.rstrip("/")] = posixpath.normpath(target)
    assert {"pyproject.toml", "osteoscreen", "models"} <= set(copied)
    # the editable install of /opt/osteoscreen: PROJECT_ROOT is the folder holding the package
    root = Path(copied["osteoscreen"]).parent
    assert Path(copied["models"]) == root / "models"
    for shipped in (config_module.DEFAULT_MODEL, localize_net.WEIGHTS_PATH):
        relative = shipped.relative_to(config_module.PROJECT_ROOT)
        assert relative.parts[0] in copied and shipped.is_file(), shipped
    assert copied["pyproject.toml"] == str(root / "pyproject.toml")


def test_dockerignore_keeps_the_environment_and_history_out():
    for path in (".venv", ".git", "var", "demo-output", "runs", "docker/.env", ".pytest_cache",
                 "osteoscreen/__pycache__", "osteoscreen.egg-info"):
        assert dockerignore_excludes(path), path
    for path in ("osteoscreen", "osteoscreen/cli/__init__.py", "models/osteoscreen-v0.3.pt", "models/localiser-v1.pt",
                 "pyproject.toml", "README.md", "docker/Dockerfile"):
        assert not dockerignore_excludes(path), path


# -- the documentation -----------------------------------------------------------------------------------
def test_deployment_doc_covers_the_operations():
    text = DEPLOYMENT_DOC.read_text()
    for needle in ("docker compose -f docker/compose.yaml up", "--scale worker=", "compose.gpu.yaml",
                   "web hash-password", "pg_dump", "echoscu", "storescu", "osteoscreen db upgrade",
                   "/metrics", "metrics_token", "allowed_calling_aets", "tls", "docs/SCALING.md", "systemd",
                   "POSTGRES_PASSWORD"):
        assert needle in text, needle
    commands = documented_commands(text)
    assert any(argv[:2] == ["web", "hash-password"] for argv in commands)
    assert any(argv[:2] == ["db", "upgrade"] for argv in commands)
    for argv in commands:
        parse_command(argv)


_OPTIONS_WITH_VALUE = {"-u", "--user", "-v", "--volume", "-e", "--env", "--name", "-w", "--workdir",
                       "--entrypoint", "-p", "--publish", "-l", "--label", "-f", "--file"}


def _after_options(tokens: list[str], j: int) -> int:
    while j < len(tokens) and tokens[j].startswith("-"):
        j += 2 if tokens[j] in _OPTIONS_WITH_VALUE else 1
    return j


def documented_commands(text: str) -> list[list[str]]:
    """The osteoscreen argument lists in the document's code blocks: `docker compose … run [options]
    <role service> ARGS`, `docker compose … exec <service> osteoscreen ARGS`, `docker run … osteoscreen:TAG
    ARGS`, and lines running an osteoscreen executable (shell or systemd ExecStart=)."""
    out = []
    for block in re.findall(r"```(?:sh|ini)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            if tokens[:2] == ["docker", "compose"]:
                j = _after_options(tokens, 2)
                if j + 1 < len(tokens) and tokens[j] in ("run", "exec"):
                    k = _after_options(tokens, j + 1)
                    if k < len(tokens) and tokens[k] in ROLES:
                        if tokens[j] == "run":
                            out.append(tokens[k + 1:])
                        elif tokens[k + 1:k + 2] == ["osteoscreen"]:
                            out.append(tokens[k + 2:])
            elif tokens[:2] == ["docker", "run"]:
                k = _after_options(tokens, 2)
                if k < len(tokens) and tokens[k].startswith("osteoscreen:"):
                    out.append(tokens[k + 1:])
            elif tokens:
                executable = tokens[0].removeprefix("ExecStart=")
                if executable == "osteoscreen" or executable.endswith("/bin/osteoscreen"):
                    out.append(tokens[1:])
    return out
