"""docker/compose.yaml checked against the code, without Docker.

The compose file is read as YAML with its ${...} references filled from docker/.env.example,
and every value a service hands to feedloop or vLLM is compared with what the code reads:
app.settings.Settings (each feedloop service's environment is loaded into it), the click
commands of app.cli, the entry point in setup.cfg and the Dockerfile, the vLLM command of
trainer.vllm_server and the environment of its LoRA resolver (trainer.lora_resolver), and the
object store every process shares state through (no volume is shared writable state). Each check returns a list of problems, so the tests can also show that a
deliberately broken copy of the file is caught by the same check.
"""

from __future__ import annotations

import configparser
import importlib
import json
import os
import re
import shlex
from collections.abc import Callable
from operator import attrgetter
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock
from urllib.parse import urlsplit

import click
import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import make_url

from app.gateway import create_app
from app.settings import Settings, env_name
from trainer.lora_resolver import storage_from_environment
from trainer.vllm_server import VllmServerConfig

ROOT = Path(__file__).parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"

VLLM_IMAGE = "vllm/vllm-openai"
KAFKA_IMAGE = "apache/kafka"
S3_IMAGE = "chrislusf/seaweedfs"
S3_DEFAULT_PORT = 8333  # weed's -s3.port default
POSTGRES_IMAGE = "postgres"
POSTGRES_PORT = 5432  # the postgres image listens on its default port
# Read by the CPU build of vLLM only (trainer/vllm_server.py); the CUDA image ignores them.
CPU_ONLY_VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE", "VLLM_HOST_IP"}

Compose = dict[str, Any]


# --- reading the files -------------------------------------------------------------------------


def dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as docker compose reads them; surrounding quotes are not part of the value."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


_REFERENCE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """The compose file with every ${NAME}, ${NAME:-default} and ${NAME:?error} filled in.

    Builds new containers throughout, so a YAML alias shared by several services becomes an
    independent copy per service (a mutation of one service leaves the others alone)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def fill(match: re.Match) -> str:
        name, operator, argument = match.groups()
        if env.get(name):
            return env[name]
        if operator in (":-", "-"):
            return argument
        raise AssertionError(f"${{{name}}} is neither in {ENV_EXAMPLE.name} nor given a default")

    return _REFERENCE.sub(fill, value)


def load_compose() -> Compose:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), dotenv(ENV_EXAMPLE))


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def argv(value: str | list | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(item) for item in value]


def dockerfile_of(service: dict) -> tuple[Path, str | None] | None:
    build = service.get("build")
    if not isinstance(build, dict):
        return None
    context = (DOCKER / build.get("context", ".")).resolve()
    return (context / build.get("dockerfile", "Dockerfile")).resolve(), build.get("target")


def feedloop_services(compose: Compose) -> dict[str, dict]:
    """The services that run the feedloop image(s) built from docker/Dockerfile."""
    return {
        name: service
        for name, service in compose["services"].items()
        if (built := dockerfile_of(service)) and built[0] == DOCKERFILE.resolve()
    }


def base_image(service: dict) -> str:
    """The image a service runs, or for one built here, the image its Dockerfile starts FROM."""
    built = dockerfile_of(service)
    if built and built[0].exists():
        stages = dockerfile_stages(built[0])
        stage = stages[built[1]] if built[1] else list(stages.values())[-1]
        while stage["from"] in stages:
            stage = stages[stage["from"]]
        return stage["from"]
    return str(service.get("image", ""))


def vllm_services(compose: Compose) -> dict[str, dict]:
    """vLLM's image, or an image built on it (docker/Dockerfile.vllm adds feedloop's resolver)."""
    return {n: s for n, s in compose["services"].items() if base_image(s).startswith(VLLM_IMAGE)}


def long_running(service: dict) -> bool:
    return service.get("restart", "no") != "no"


def replicas(service: dict) -> int:
    return int((service.get("deploy") or {}).get("replicas", 1))


def vllm_plugins() -> dict[str, str]:
    """name -> 'module:attribute' of setup.cfg's vllm.general_plugins entry points."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options.entry_points"]["vllm.general_plugins"].strip().splitlines()
    return {name.strip(): target.strip() for name, _, target in (line.partition("=") for line in lines)}


def settings_of(service: dict) -> Settings:
    """The Settings a feedloop process in this service would read: its environment, nothing else."""
    with mock.patch.dict(os.environ, environment(service), clear=True):
        return Settings(_env_file=None)


def setting_variables(model: type[BaseModel], prefix: str = "FEEDLOOP_") -> set[str]:
    """Every variable pydantic-settings maps onto a field; a nested group may also be set whole.
    A top-level field may be named by its FEEDLOOP_ alias (FEEDLOOP_KAFKA__* for kafka_security)."""
    names = set()
    for field_name, field in model.model_fields.items():
        name = env_name(field_name, field) if model is Settings else prefix + field_name.upper()
        names.add(name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names |= setting_variables(field.annotation, name + "__")
    return names


def dockerfile_stages(path: Path) -> dict[str, dict]:
    """Stage name (or #index) -> {"from": base, "entrypoint": [...] or None}, in file order."""
    lines, pending = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") or (not pending and not raw.strip()):
            continue  # comments, also between continued lines, are not part of an instruction
        pending += raw.rstrip("\\").strip() + " "
        if not raw.endswith("\\"):
            lines.append(pending.strip())
            pending = ""
    stages: dict[str, dict] = {}
    stage: dict = {}
    for line in lines:
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            parts = [word for word in rest.split() if not word.startswith("--")]
            stage = {"from": parts[0], "entrypoint": None}
            stages[parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else f"#{len(stages)}"] = stage
        elif instruction.upper() == "ENTRYPOINT":
            stage["entrypoint"] = json.loads(rest)
    return stages


def stage_entrypoint(stages: dict[str, dict], target: str | None) -> list[str]:
    """ENTRYPOINT of a build target (default: the last stage), inherited through FROM <stage>."""
    stage = stages[target] if target else list(stages.values())[-1]
    while stage["entrypoint"] is None and stage["from"] in stages:
        stage = stages[stage["from"]]
    return stage["entrypoint"] or []


def console_scripts() -> dict[str, str]:
    """name -> 'module:attribute' from setup.cfg's console_scripts."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    scripts = {}
    for line in config["options.entry_points"]["console_scripts"].strip().splitlines():
        name, _, target = line.partition("=")
        scripts[name.strip()] = target.strip()
    return scripts


class Mount(NamedTuple):
    source: str
    target: str
    read_only: bool


def mounts(service: dict) -> list[Mount]:
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found.append(Mount(volume.get("source", ""), volume["target"], bool(volume.get("read_only"))))
        else:
            source, target, *mode = volume.split(":")
            found.append(Mount(source, target, "ro" in (mode[0].split(",") if mode else [])))
    return found


def mount_covering(service: dict, path: Path) -> Mount | None:
    """The mount a process in this service reaches ``path`` through (the deepest one)."""
    covering = [m for m in mounts(service) if path == Path(m.target) or Path(m.target) in path.parents]
    return max(covering, key=lambda m: len(Path(m.target).parts), default=None)


def container_ports(service: dict) -> set[int]:
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(str(port).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def flags(args: list[str]) -> dict[str, str | bool]:
    """--name value / --name=value / bare --name (True) from a command line."""
    found: dict[str, str | bool] = {}
    for index, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, equals, value = arg.partition("=")
        if equals:
            found[name] = value
        elif index + 1 < len(args) and not args[index + 1].startswith("--"):
            found[name] = args[index + 1]
        else:
            found[name] = True
    return found


def healthcheck_url(service: dict) -> str | None:
    match = re.search(r"https?://[^\s'\"]+", " ".join(argv((service.get("healthcheck") or {}).get("test"))))
    return match.group(0) if match else None


def devices(service: dict) -> list[dict]:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def docs_section(text: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    return match.group(1) if match else ""


# --- the checks: each returns the problems it found --------------------------------------------


def check_variables(compose: Compose) -> list[str]:
    """feedloop services are configured by real FEEDLOOP_* settings only, with valid values."""
    known = setting_variables(Settings)
    problems = []
    for name, service in feedloop_services(compose).items():
        for variable in environment(service):
            if variable not in known:
                problems.append(f"{name}: {variable} is not a setting of app.settings.Settings")
        try:
            settings_of(service)
        except ValidationError as exc:
            problems.append(f"{name}: invalid settings: {exc}")
    return problems


def click_problem(group: click.Group, script: str, words: list[str]) -> str | None:
    """Why ``script words...`` is not a runnable command of ``group`` (None if it is)."""
    command: click.Command = group
    context = click.Context(group, info_name=script)
    path = [script]
    while isinstance(command, click.Group):
        if not words:
            return f"'{' '.join(path)}' needs a subcommand"
        word, words = words[0], words[1:]
        sub = command.get_command(context, word)
        if sub is None:
            return f"'{' '.join(path)}' has no command {word!r}"
        path.append(word)
        context = click.Context(sub, info_name=word, parent=context)
        command = sub
    try:
        command.make_context(path[-1], list(words), parent=context.parent)
    except click.ClickException as exc:
        return f"'{' '.join(path)}': {exc.format_message()}"
    return None


def check_commands(compose: Compose) -> list[str]:
    """Every feedloop service runs a real command path of the `feedloop` click group."""
    scripts = console_scripts()
    problems = []
    for name, service in feedloop_services(compose).items():
        dockerfile, target = dockerfile_of(service)
        stages = dockerfile_stages(dockerfile)
        if target and target not in stages:
            problems.append(f"{name}: {dockerfile.name} has no stage {target!r}")
            continue
        entrypoint = argv(service.get("entrypoint")) or stage_entrypoint(stages, target)
        command = entrypoint + argv(service.get("command"))
        if not command or command[0] not in scripts:
            problems.append(f"{name}: runs {command[:1]}, not a console script of setup.cfg ({sorted(scripts)})")
            continue
        module, _, attribute = scripts[command[0]].partition(":")
        group = getattr(importlib.import_module(module), attribute)
        if problem := click_problem(group, command[0], command[1:]):
            problems.append(f"{name}: {problem}")
    return problems


# trainer.lora too: the swap controller builds the zero-delta adapter at the trainer's rank.
SHARED = ("bootstrap_servers", "store_url", "data_dir", "keys_path", "adapters_path", "model_path",
          "topic_partitions", "topic_replication", "vllm_urls", "learners", "serving", "trainer.lora")  # fmt: skip


def check_shared_config(compose: Compose) -> list[str]:
    """All feedloop processes agree on the broker, store, topics, paths, router and serving."""
    configured = {name: settings_of(service) for name, service in feedloop_services(compose).items()}
    first_name, first = next(iter(configured.items()))
    problems = []
    for field in SHARED:
        value = attrgetter(field)
        problems += [f"{name}: {field} = {value(settings)!r}, but {first_name} has {value(first)!r}"
                     for name, settings in configured.items() if value(settings) != value(first)]  # fmt: skip
    return problems


def check_kafka(compose: Compose) -> list[str]:
    """FEEDLOOP_BROKER names advertised listeners of the kafka services; topics fit the cluster."""
    advertised: dict[str, str] = {}  # host:port -> service
    brokers = 0
    problems = []
    for name, service in compose["services"].items():
        if not str(service.get("image", "")).startswith(KAFKA_IMAGE):
            continue
        env = environment(service)
        brokers += "broker" in env.get("KAFKA_PROCESS_ROLES", "").split(",")
        listening = dict(re.findall(r"(\w+)://[^:,]*:(\d+)", env.get("KAFKA_LISTENERS", "")))
        for listener, host, port in re.findall(r"(\w+)://([^:,]+):(\d+)", env.get("KAFKA_ADVERTISED_LISTENERS", "")):
            if host not in (name, service.get("hostname")):
                problems.append(f"{name}: advertises {host}:{port}, a name other containers cannot resolve")
            if listening.get(listener) != port:
                problems.append(f"{name}: advertises {listener} on {port} but listens on {listening.get(listener)}")
            advertised[f"{host}:{port}"] = name
        if env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE") != "false":
            problems.append(f"{name}: KAFKA_AUTO_CREATE_TOPICS_ENABLE must be false (feedloop creates its topics)")
    for name, service in feedloop_services(compose).items():
        settings = settings_of(service)
        for server in settings.bootstrap_servers.split(","):
            if server not in advertised:
                problems.append(f"{name}: broker {server} is not an advertised listener ({sorted(advertised)})")
        if settings.topic_replication > brokers:
            problems.append(f"{name}: FEEDLOOP_TOPIC_REPLICATION={settings.topic_replication} > {brokers} broker(s)")
    return problems


def check_postgres(compose: Compose) -> list[str]:
    """FEEDLOOP_DATABASE_URL points at the postgres service with its user, password and database."""
    problems = []
    for name, service in feedloop_services(compose).items():
        url = make_url(settings_of(service).store_url)
        if url.get_backend_name() != "postgresql":
            problems.append(f"{name}: store is {url.get_backend_name()}, not the postgres service")
            continue
        database = compose["services"].get(url.host)
        if database is None or not str(database.get("image", "")).startswith(POSTGRES_IMAGE):
            problems.append(f"{name}: database host {url.host!r} is not a postgres service")
            continue
        env = environment(database)
        user = env.get("POSTGRES_USER", "postgres")
        expected = {"port": POSTGRES_PORT, "username": user, "password": env.get("POSTGRES_PASSWORD"),
                    "database": env.get("POSTGRES_DB", user)}  # fmt: skip
        for part, value in expected.items():
            found = getattr(url, part) or (POSTGRES_PORT if part == "port" else None)
            if found != value:
                problems.append(f"{name}: database URL {part} is {found!r}, the {url.host} service has {value!r}")
    return problems


def check_gateway(compose: Compose) -> list[str]:
    """The gateway binds all interfaces on its port, publishes it, and is health-checked on /healthz."""
    service = compose["services"]["gateway"]
    settings = settings_of(service)
    problems = []
    if settings.gateway_host != "0.0.0.0":
        problems.append(f"gateway binds {settings.gateway_host}: unreachable from outside its container")
    if settings.gateway_port not in container_ports(service):
        problems.append(f"gateway listens on {settings.gateway_port}, publishes {sorted(container_ports(service))}")
    url = urlsplit(healthcheck_url(service) or "")
    # Without the lifespan (no broker, no store): the health route must answer on its own.
    answered = TestClient(create_app(settings)).get(url.path or "/").status_code == 200
    if url.port != settings.gateway_port or not answered:
        problems.append(f"gateway health check asks {url.geturl()!r}, which the gateway on "
                        f"port {settings.gateway_port} does not answer with 200")
    return problems


def check_vllm(compose: Compose) -> list[str]:
    """Every FEEDLOOP_VLLM_URLS entry is a vllm service started like trainer/vllm_server.py does."""
    services = compose["services"]
    settings = settings_of(services["swap"])
    lora_rank = settings_of(services["trainer"]).trainer.lora.rank
    code = VllmServerConfig(model_path=settings.model_path)
    code_command = code.command("python3")
    with mock.patch.dict(os.environ, {}, clear=True):
        code_env = {k: v for k, v in code.environment().items() if k not in CPU_ONLY_VLLM_ENV}
    problems = []
    replicas = vllm_services(compose)
    for url in map(urlsplit, settings.vllm_urls):
        service = replicas.get(url.hostname)
        if service is None:
            problems.append(f"FEEDLOOP_VLLM_URLS names {url.hostname!r}, not a {VLLM_IMAGE} service")
        elif flags(argv(service.get("command"))).get("--port") != str(url.port):
            problems.append(f"FEEDLOOP_VLLM_URLS: {url.hostname} port {url.port} is not its --port")
    for name, service in replicas.items():
        args = flags(argv(service.get("command")))
        if argv(service.get("entrypoint"))[1:] != code_command[1:3]:
            problems.append(f"{name}: entrypoint is not python -m {code_command[2]}")
        problems += [f"{name}: missing {flag}" for flag in flags(code_command) if flag not in args]
        expected = {"--host": "0.0.0.0", "--model": str(settings.model_path),
                    "--served-model-name": settings.serving.served_model_name}  # fmt: skip
        problems += [f"{name}: {flag} is {args.get(flag)!r}, not {value!r}" for flag, value in expected.items()
                     if args.get(flag) != value]  # fmt: skip
        rank = int(args.get("--max-lora-rank", 0))
        if rank < max(lora_rank, settings.serving.max_lora_rank):
            problems.append(f"{name}: --max-lora-rank {rank} < trainer rank {lora_rank} "
                            f"or FEEDLOOP_SERVING__MAX_LORA_RANK {settings.serving.max_lora_rank}")  # fmt: skip
        loras = int(args.get("--max-loras", 0))
        if loras != settings.serving.max_loras or int(args.get("--max-cpu-loras", 0)) < loras:
            problems.append(f"{name}: --max-loras {loras} must equal FEEDLOOP_SERVING__MAX_LORAS "
                            f"{settings.serving.max_loras} and not exceed --max-cpu-loras")  # fmt: skip
        env = environment(service)
        problems += [f"{name}: {k}={env.get(k)!r}, trainer/vllm_server.py sets {v!r}" for k, v in code_env.items()
                     if env.get(k) != v]  # fmt: skip
        if urlsplit(healthcheck_url(service) or "").port != int(args.get("--port", 0)):
            problems.append(f"{name}: health check is not on --port")
        if settings.serving.replicas_fetch:
            problems += resolver_problems(name, service, settings)
    return problems


def resolver_problems(name: str, service: dict, swap: Settings) -> list[str]:
    """A replica in fetch mode loads feedloop's resolver and reads the bucket the swap
    controller approves adapters in (trainer/lora_resolver.py, docs/serving.md)."""
    env = environment(service)
    problems = []
    if storage_from_environment(env) != swap.storage:
        problems.append(f"{name}: the resolver's FEEDLOOP_STORAGE__* differ from the swap controller's "
                        "(without FEEDLOOP_STORAGE__URL it registers nothing)")  # fmt: skip
    plugins = vllm_plugins()
    if "VLLM_PLUGINS" in env and not set(env["VLLM_PLUGINS"].split(",")) & set(plugins):
        problems.append(f"{name}: VLLM_PLUGINS={env['VLLM_PLUGINS']!r} leaves out feedloop's {sorted(plugins)}")
    built = dockerfile_of(service)
    text = built[0].read_text() if built and built[0].exists() else ""
    installs = re.search(r"pip install(?:[^\n]*\\\n)*[^\n]*", text)  # with its continued lines
    command = installs.group(0) if installs else ""
    if not all(word in command for word in ("--no-deps", " . ", "obstore", "structlog")):
        problems.append(f"{name}: its image does not install feedloop (--no-deps) with obstore and structlog, "
                        "so vLLM has no feedloop resolver")  # fmt: skip
    return problems


def check_volumes(compose: Compose) -> list[str]:
    """No volume is shared writable state: the bucket is. The base model is read-only."""
    services = compose["services"]
    named = compose.get("volumes") or {}
    problems = []

    # A volume a long-running service writes is that one container's: no other service, and
    # no second replica, mounts it. (model-init, one-shot, writes the models the others read.)
    for volume in named:
        users = {name: m for name, service in services.items() for m in mounts(service) if m.source == volume}
        writers = [name for name, m in users.items() if not m.read_only and long_running(services[name])]
        for writer in writers:
            others = sorted(set(users) - {writer})
            if others or replicas(services[writer]) > 1:
                problems.append(f"{writer}: writes the {volume} volume, which is shared "
                                f"({', '.join(others) or f'{replicas(services[writer])} replicas'}); "
                                "shared state belongs in the bucket (FEEDLOOP_STORAGE__URL)")  # fmt: skip

    feedloop = feedloop_services(compose)
    for name, service in feedloop.items():
        settings = settings_of(service)
        if settings.keys_path is not None and long_running(service):
            # Keys in a container's own directory: each worker and gateway would pseudonymise
            # with keys of its own, and an erasure would shred only one copy.
            problems.append(f"{name}: pseudonym keys in {settings.keys_path}, not shared with the other processes: "
                            "leave FEEDLOOP_KEY_DIR unset, the keys are then keys/ of the bucket")  # fmt: skip

    models_path = settings_of(services["trainer"]).model_path
    models = (mount_covering(services["trainer"], models_path) or Mount("", "", False)).source
    for name in ("trainer", "swap", "judge", *vllm_services(compose)):
        mount = mount_covering(services[name], models_path)
        if mount is None:
            problems.append(f"{name}: needs the base model over {models_path}, has no mount there")
        elif mount.source not in named:
            problems.append(f"{name}: {mount.source} on {mount.target} is not a named volume")
        elif mount.source != models:
            problems.append(f"{name}: reads the base model from {mount.source}, the trainer from {models}")
        elif not mount.read_only:
            problems.append(f"{name}: {mount.target} must be read-only (the base model)")
    return problems


def s3_services(compose: Compose) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if str(s.get("image", "")).startswith(S3_IMAGE)
            and "-s3" in argv(s.get("command"))}  # fmt: skip


def check_storage(compose: Compose) -> list[str]:
    """Every process that shares state reaches one bucket on the S3 service, with its
    credentials, and starts after the bucket exists; replicas fetch adapters from it."""
    services = compose["services"]
    servers = s3_services(compose)
    readers = {name: service for name, service in services.items()
               if name in feedloop_services(compose) or name in vllm_services(compose)}  # fmt: skip
    problems = []
    for name, service in readers.items():
        if name in vllm_services(compose):
            storage = storage_from_environment(environment(service))
        else:
            settings = settings_of(service)
            storage = settings.storage
            if urlsplit(storage.url or "").scheme == "s3" and not settings.serving.replicas_fetch:
                problems.append(f"{name}: FEEDLOOP_SERVING__REPLICAS_FETCH is off, so vLLM would be sent "
                                "adapter paths on a disk it does not share")  # fmt: skip
        url = urlsplit(storage.url or "")
        if url.scheme != "s3" or not url.netloc:
            problems.append(f"{name}: FEEDLOOP_STORAGE__URL is {storage.url!r}, not s3://bucket/prefix: "
                            "without it the shared state is this container's own data directory")  # fmt: skip
            continue
        endpoint = urlsplit(storage.endpoint or "")
        server = servers.get(endpoint.hostname or "")
        if server is None:
            problems.append(f"{name}: FEEDLOOP_STORAGE__ENDPOINT {storage.endpoint!r} is not an S3 service "
                            f"({sorted(servers)})")  # fmt: skip
            continue
        port = int(next((arg.partition("=")[2] for arg in argv(server.get("command")) if arg.startswith("-s3.port=")),
                        S3_DEFAULT_PORT))  # fmt: skip
        if (endpoint.port or {"http": 80, "https": 443}.get(endpoint.scheme)) != port:
            problems.append(f"{name}: FEEDLOOP_STORAGE__ENDPOINT port {endpoint.port} is not {endpoint.hostname}'s "
                            f"-s3.port {port}")  # fmt: skip
        if storage.allow_http != (endpoint.scheme == "http"):
            problems.append(f"{name}: FEEDLOOP_STORAGE__ALLOW_HTTP={storage.allow_http} "
                            f"for a {endpoint.scheme} endpoint")  # fmt: skip
        env = environment(server)
        secret = storage.secret_access_key.get_secret_value() if storage.secret_access_key else None
        if (storage.access_key_id, secret) != (env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")):
            problems.append(f"{name}: its S3 credentials are not {endpoint.hostname}'s admin credentials "
                            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY there)")  # fmt: skip
        creates = f"s3.bucket.create -name {url.netloc}"
        makers = [other for other, s in services.items()
                  if not long_running(s) and creates in " ".join(argv(s.get("entrypoint")) + argv(s.get("command")))]
        waits = {dependency for dependency, condition in (service.get("depends_on") or {}).items()
                 if (condition or {}).get("condition") == "service_completed_successfully"}  # fmt: skip
        if not makers:
            problems.append(f"{name}: no one-shot service creates the bucket {url.netloc!r} (s3.bucket.create)")
        elif long_running(service) and not waits & set(makers):
            problems.append(f"{name}: starts without waiting for {makers[0]} to create the bucket "
                            "(a list before the first upload fails with NoSuchBucket)")  # fmt: skip
    return problems


def check_gpus(compose: Compose) -> list[str]:
    """The trainer and every vLLM replica reserve NVIDIA GPUs, no two the same one."""
    problems, taken = [], {}
    for name in ("trainer", *vllm_services(compose)):
        gpus = [d for d in devices(compose["services"][name])
                if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]  # fmt: skip
        if not gpus:
            problems.append(f"{name}: reserves no NVIDIA GPU (deploy.resources.reservations.devices)")
        for device_id in (str(i) for gpu in gpus for i in gpu.get("device_ids", [])):
            if device_id in taken:
                problems.append(f"{name}: GPU {device_id} is already reserved by {taken[device_id]}")
            taken[device_id] = name
    return problems


def check_healthchecks(compose: Compose, docs: str) -> list[str]:
    """Long-running services are health-checked, or have a "- `name`: why" item in docs/deployment.md."""
    explained = docs_section(docs, "Health checks")
    services = compose["services"]
    problems = []
    for name, service in services.items():
        if "restart" not in service:
            problems.append(f"{name}: states no restart policy ('no' for one-shot services)")
            continue
        if service["restart"] == "no":
            continue
        check = service.get("healthcheck") or {}
        if check.get("disable"):
            if f"- `{name}`:" not in explained:
                problems.append(f"{name}: health check disabled without a reason in docs/deployment.md")
        elif not argv(check.get("test")):
            problems.append(f"{name}: no health check")
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            unhealthy = (services.get(dependency, {}).get("healthcheck") or {}).get("disable")
            if condition.get("condition") == "service_healthy" and unhealthy:
                problems.append(f"{name}: waits for {dependency} to be healthy, which it never reports")
    return problems


# The name each long-running command beats its heartbeat under (app/cli.py).
HEARTBEATS = {("worker",): "worker", ("learn",): "learner", ("train",): "trainer", ("swap",): "swap",
              ("archive", "run"): "archiver", ("judge",): "judge"}


def check_liveness(compose: Compose) -> list[str]:
    """Each process without HTTP is health-checked by `feedloop health` on its own heartbeat."""
    problems = []
    for name, service in feedloop_services(compose).items():
        process = HEARTBEATS.get(tuple(argv(service.get("command"))))
        if process is None:
            continue
        test = argv((service.get("healthcheck") or {}).get("test"))
        if test != ["CMD", "feedloop", "health", process]:
            problems.append(f"{name}: health check {test}, not `feedloop health {process}`")
    return problems


def check_scaling(compose: Compose) -> list[str]:
    """Worker replicas fit the partitions; two learners run (one active, the other a standby)."""
    services = compose["services"]
    problems = []
    workers = replicas(services["worker"])
    partitions = settings_of(services["worker"]).topic_partitions
    if workers > partitions:
        problems.append(f"worker: {workers} replicas for {partitions} partitions; {workers - partitions} would idle")
    learners = sum(replicas(service) for service in feedloop_services(compose).values()
                   if argv(service.get("command")) == ["learn"])  # fmt: skip
    if learners < 1:
        problems.append(f"learner: {learners} replicas; nothing would route, run one (and a standby)")
    elif learners < 2:
        problems.append("learner: one `feedloop learn`, no standby to take over its lease")
    return problems


CHECKS: dict[str, Callable[[Compose], list[str]]] = {
    "variables": check_variables,
    "commands": check_commands,
    "shared_config": check_shared_config,
    "kafka": check_kafka,
    "postgres": check_postgres,
    "gateway": check_gateway,
    "vllm": check_vllm,
    "volumes": check_volumes,
    "storage": check_storage,
    "gpus": check_gpus,
    "healthchecks": lambda compose: check_healthchecks(compose, DEPLOYMENT_DOC.read_text()),
    "liveness": check_liveness,
    "scaling": check_scaling,
}


# --- the tests ---------------------------------------------------------------------------------


def test_compose_has_the_production_services():
    services = load_compose()["services"]
    wanted = {"kafka", "postgres", "seaweedfs", "storage-init", "migrate", "archiver", "worker", "learner",
              "learner-standby", "trainer", "swap", "judge", "gateway", "vllm"}  # fmt: skip
    assert wanted <= set(services)
    assert set(feedloop_services(load_compose())) >= wanted - {"kafka", "postgres", "seaweedfs", "storage-init", "vllm"}
    assert set(vllm_services(load_compose())) == {"vllm"} and set(s3_services(load_compose())) == {"seaweedfs"}


@pytest.mark.parametrize("check", CHECKS)
def test_compose_matches_the_code(check):
    assert CHECKS[check](load_compose()) == []


def put(path: str, value: Any) -> Callable[[Compose], None]:
    """A mutation setting services.<path> (dot-separated; list items by index) to ``value``."""

    def mutate(compose: Compose) -> None:
        *parents, last = path.split(".")
        node = compose["services"]
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is None:
            node.pop(last)
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def vllm_flag(flag: str, value: str | None) -> Callable[[Compose], None]:
    """A mutation changing (or, with None, removing) one flag of the vllm service's command."""

    def mutate(compose: Compose) -> None:
        command = compose["services"]["vllm"]["command"]
        index = command.index(flag)
        has_value = index + 1 < len(command) and not command[index + 1].startswith("--")
        if value is None:
            del command[index:index + 1 + has_value]
        else:
            command[index + 1] = value

    return mutate


BROKEN = {
    "unknown variable": ("variables", "FEEDLOOP_GATEWAY_PROT", put("gateway.environment.FEEDLOOP_GATEWAY_PROT", "1")),
    "foreign variable": ("variables", "KAFKA_BOOTSTRAP", put("worker.environment.KAFKA_BOOTSTRAP", "kafka:9092")),
    "invalid value": ("variables", "invalid settings", put("worker.environment.FEEDLOOP_TOPIC_PARTITIONS", "many")),
    "unknown command": ("commands", "'wroker'", put("worker.command", ["wroker"])),
    "group without subcommand": ("commands", "needs a subcommand", put("archiver.command", ["archive"])),
    "unknown option": ("commands", "--prot", put("gateway.command", ["gateway", "--prot", "1"])),
    "missing build target": ("commands", "no stage", put("gateway.build.target", "gateway")),
    "routers disagree": ("shared_config", "learners",
                         put("gateway.environment.FEEDLOOP_LEARNERS__INITIAL_ARMS", '["other"]')),
    "lora ranks disagree": ("shared_config", "trainer.lora",
                            put("trainer.environment.FEEDLOOP_TRAINER__LORA__RANK", "16")),
    "wrong broker port": ("kafka", "kafka:9093", put("gateway.environment.FEEDLOOP_BROKER", "kafka://kafka:9093")),
    "replication above brokers": ("kafka", "FEEDLOOP_TOPIC_REPLICATION=3",
                                  put("worker.environment.FEEDLOOP_TOPIC_REPLICATION", "3")),
    "advertised port not listened on": ("kafka", "listens on", put("kafka.environment.KAFKA_LISTENERS",
                                                                   "PLAINTEXT://:9094,CONTROLLER://:9093")),
    "topic auto-creation": ("kafka", "AUTO_CREATE", put("kafka.environment.KAFKA_AUTO_CREATE_TOPICS_ENABLE", "true")),
    "wrong database user": ("postgres", "username", put("postgres.environment.POSTGRES_USER", "admin")),
    "wrong database port": ("postgres", "port", put(
        "trainer.environment.FEEDLOOP_DATABASE_URL", "postgresql+psycopg://feedloop:change-me@postgres:5433/feedloop")),
    "sqlite store": ("postgres", "sqlite", put("learner.environment.FEEDLOOP_DATABASE_URL", None)),
    "gateway on loopback": ("gateway", "binds 127.0.0.1",
                            put("gateway.environment.FEEDLOOP_GATEWAY_HOST", "127.0.0.1")),
    "gateway port not published": ("gateway", "publishes", put("gateway.ports.0", "8080:8081")),
    "gateway health on a missing route": ("gateway", "health check", put(
        "gateway.healthcheck.test.3", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health')")),
    "vllm url port": ("vllm", "not its --port", vllm_flag("--port", "8001")),
    "lora rank too low": ("vllm", "--max-lora-rank 4", vllm_flag("--max-lora-rank", "4")),
    "served model name": ("vllm", "--served-model-name", vllm_flag("--served-model-name", "llama")),
    "model path": ("vllm", "--model", vllm_flag("--model", "/models/other")),
    "lora disabled": ("vllm", "missing --enable-lora", vllm_flag("--enable-lora", None)),
    "cpu loras below loras": ("vllm", "--max-cpu-loras", vllm_flag("--max-cpu-loras", "2")),
    "runtime lora updating off": ("vllm", "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
                                  put("vllm.environment.VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)),
    "vllm url not a service": ("vllm", "'vllm-9'",
                               put("swap.environment.FEEDLOOP_VLLM_URLS", '["http://vllm-9:8000"]')),
    "vllm without the store": ("vllm", "FEEDLOOP_STORAGE__", put("vllm.environment.FEEDLOOP_STORAGE__URL", None)),
    "vllm on another bucket": ("vllm", "differ", put("vllm.environment.FEEDLOOP_STORAGE__URL", "s3://other/state")),
    "resolver not among vllm's plugins": ("vllm", "VLLM_PLUGINS",
                                          put("vllm.environment.VLLM_PLUGINS", "lora_filesystem_resolver")),
    "vllm without feedloop installed": ("vllm", "does not install feedloop", lambda compose: [
        put("vllm.build", None)(compose), put("vllm.image", "vllm/vllm-openai:v0.32.0")(compose)]),
    "shared writable volume": ("volumes", "shared", lambda compose: [
        compose.setdefault("volumes", {}).update(scratch=None),
        put("archiver.volumes", ["scratch:/var/lib/feedloop"])(compose),
        put("gateway.volumes", ["scratch:/var/lib/feedloop"])(compose)]),
    "writable volume across replicas": ("volumes", "3 replicas", lambda compose: [
        compose.setdefault("volumes", {}).update(scratch=None),
        put("worker.volumes", ["scratch:/var/lib/feedloop"])(compose)]),
    "the bucket's volume in a feedloop service": ("volumes", "seaweedfs",
                                                  put("trainer.volumes", ["models:/models:ro", "objects:/srv"])),
    "keys in a container directory": ("volumes", "pseudonym keys",
                                      put("worker.environment.FEEDLOOP_KEY_DIR", "/var/lib/feedloop-keys")),
    "base model writable": ("volumes", "read-only", put("trainer.volumes.0", "models:/models")),
    "no base model for the judge": ("volumes", "judge: needs the base model", put("judge.volumes", [])),
    "bind mount": ("volumes", "not a named volume", put("vllm.volumes.0", "/srv/models:/models:ro")),
    "no storage url": ("storage", "not s3://", put("worker.environment.FEEDLOOP_STORAGE__URL", None)),
    "storage on the container's disk": ("storage", "not s3://",
                                        put("archiver.environment.FEEDLOOP_STORAGE__URL", "file:///var/lib/feedloop")),
    "endpoint not the s3 service": ("storage", "not an S3 service",
                                    put("gateway.environment.FEEDLOOP_STORAGE__ENDPOINT", "http://minio:9000")),
    "endpoint port": ("storage", "-s3.port",
                      put("judge.environment.FEEDLOOP_STORAGE__ENDPOINT", "http://seaweedfs:9000")),
    "plain http refused": ("storage", "ALLOW_HTTP", put("worker.environment.FEEDLOOP_STORAGE__ALLOW_HTTP", "false")),
    "wrong secret": ("storage", "credentials", put("swap.environment.FEEDLOOP_STORAGE__SECRET_ACCESS_KEY", "other")),
    "server credentials": ("storage", "credentials", put("seaweedfs.environment.AWS_ACCESS_KEY_ID", "root")),
    "bucket never created": ("storage", "creates the bucket", put("storage-init.command", ["true"])),
    "started before the bucket": ("storage", "waiting for storage-init",
                                  put("archiver.depends_on.storage-init", None)),
    "vllm started before the bucket": ("storage", "vllm: starts without", put("vllm.depends_on", None)),
    "replicas sent paths": ("storage", "REPLICAS_FETCH",
                            put("swap.environment.FEEDLOOP_SERVING__REPLICAS_FETCH", "false")),
    "no gpu for the trainer": ("gpus", "trainer: reserves no NVIDIA GPU", put("trainer.deploy", None)),
    "shared gpu": ("gpus", "already reserved",
                   put("trainer.deploy.resources.reservations.devices.0.device_ids", ["0"])),
    "gateway unchecked": ("healthchecks", "gateway: no health check", put("gateway.healthcheck", None)),
    "undocumented disabled check": ("healthchecks", "vllm: health check disabled",
                                    put("vllm.healthcheck", {"disable": True})),
    "no restart policy": ("healthchecks", "restart policy", put("postgres.restart", None)),
    "waiting on an unchecked service": ("healthchecks", "never reports", lambda compose: [
        put("worker.healthcheck", {"disable": True})(compose),
        put("gateway.depends_on.worker", {"condition": "service_healthy"})(compose)]),
    "a heartbeat checked under another name": ("liveness", "not `feedloop health trainer`",
                                               put("trainer.healthcheck.test.3", "worker")),
    "idle workers": ("scaling", "would idle", put("worker.deploy.replicas", 13)),
    "no learner": ("scaling", "nothing would route", lambda compose: [
        put("learner.deploy", {"replicas": 0})(compose), put("learner-standby.deploy", {"replicas": 0})(compose)]),
    "no standby learner": ("scaling", "no standby", put("learner-standby.deploy", {"replicas": 0})),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_compose_file_is_caught(case):
    check, expected, mutate = BROKEN[case]
    compose = load_compose()
    mutate(compose)
    problems = CHECKS[check](compose)
    assert any(expected in problem for problem in problems), problems


def test_interpolation_fills_defaults_and_refuses_missing_secrets():
    env = {"SET": "value"}
    assert interpolate("${SET}-${UNSET:-fallback}", env) == "value-fallback"
    with pytest.raises(AssertionError, match="SECRET"):
        interpolate("${SECRET:?set it}", env)


def example_problems(section: str, secret_file: Path | None = None) -> list[str]:
    """The FEEDLOOP_* lines of a docs section's code blocks are settings, and load together
    (each *_FILE read from ``secret_file`` instead: the example's secrets are not here)."""
    blocks = re.findall(r"^```(?:bash|sh)?\n(.*?)^```", section, re.M | re.S)
    values = {}
    for line in "\n".join(blocks).splitlines():
        key, equals, value = line.strip().partition("=")
        if equals and key.startswith("FEEDLOOP_"):
            values[key] = value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value
    if not values:
        return ["no FEEDLOOP_* variables in the example"]
    known = setting_variables(Settings)
    problems = [f"{key} is not a setting of app.settings.Settings" for key in values if key not in known]
    if secret_file is not None:
        values |= {key: str(secret_file) for key in values if key.endswith("_FILE")}
    try:
        settings_of({"environment": values})
    except ValidationError as exc:
        problems.append(f"invalid settings: {exc}")
    return problems


def test_the_managed_cloud_example_uses_real_settings(tmp_path):
    section = docs_section(DEPLOYMENT_DOC.read_text(), "Managed cloud")
    assert "FEEDLOOP_STORAGE__URL=s3://" in section and "FEEDLOOP_KAFKA__SASL_MECHANISM" in section
    secret = tmp_path / "secret"
    secret.write_text("a password\n")
    assert example_problems(section, secret) == []
    assert any("FEEDLOOP_STORAGE__BUCKET" in p for p in example_problems("```bash\nFEEDLOOP_STORAGE__BUCKET=x\n```\n"))
    assert any("invalid" in p for p in example_problems("```bash\nFEEDLOOP_KAFKA__SASL_MECHANISM=SCRAM\n```\n"))


def test_the_image_entrypoint_is_the_feedloop_console_script():
    """The compose services rely on the images' ENTRYPOINT; both targets must keep it."""
    assert console_scripts()["feedloop"] == "app.cli:main"
    stages = dockerfile_stages(DOCKERFILE)
    for target in ("feedloop", "trainer", None):
        assert stage_entrypoint(stages, target) == ["feedloop"]
