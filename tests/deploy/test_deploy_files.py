"""Static checks of the deployment files (docker-compose.yml, deploy/): no Docker engine or cluster
is needed. Every YAML parses; the Compose file and the manifests have the shape the service
needs (GPU reservations, Redis persistence, probes, KEDA on the Celery queue); every ``LOFTQ_*``
variable they name is a field of ``service.settings.Settings`` and their values validate; every
command, console script and ``module:attr`` path the containers run exists; every path the
Dockerfiles copy is in the repository and in their build context."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = REPO / "docker-compose.yml"
API_DOCKERFILE = DEPLOY / "api.Dockerfile"
WORKER_DOCKERFILE = DEPLOY / "worker.Dockerfile"
DOCKERFILES = [API_DOCKERFILE, WORKER_DOCKERFILE]
README = DEPLOY / "README.md"

PREFIX = "LOFTQ_"
OUR_IMAGES = ("loftq-service-api", "loftq-service-worker")
# Programs that are not Python console scripts: the interpreter and pip (in both images), and
# the operator's own tools that deploy/README.md tells to run. (Only commands of our own images
# are collected: redis, minio and mc commands in docker-compose.yml are their images' business.)
EXTERNAL_PROGRAMS = {"python", "python3", "pip", "docker", "kubectl", "kustomize", "curl", "mkdir", "cd"}
PROBE_PATHS = ("/healthz", "/readyz")  # liveness, readiness
# The API image must not pull these in: it is built without them.
HEAVY_MODULES = ["torch", "transformers", "safetensors", "bitsandbytes", "accelerate", "peft"]
# The API image starts the app through its launcher (uvicorn with the LOFTQ_* request timeouts and
# connection limit, api/server.py), which serves api.main's app.
API_COMMAND = ["python", "-m", "api.server", "--host", "0.0.0.0", "--port", "8000"]
API_APP = "api.main:app"
MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
LOFTQ_NAME = re.compile(r"\bLOFTQ_[A-Z0-9_]+\b")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_]\w*)(?::?-([^}]*))?\}")


# --------------------------------------------------------------------------------------------
# Loading


def _collect(find) -> list:
    """Parameters read from the files at collection time; an unreadable file becomes one failing
    case (test_yaml_parses says why) instead of a collection error that hides every other test."""
    try:
        return find()
    except Exception as exc:  # noqa: BLE001
        return [f"<deployment files unreadable: {type(exc).__name__}: {exc}>"]


def _yaml_files() -> list[Path]:
    return [COMPOSE, *sorted(DEPLOY.rglob("*.yaml")), *sorted(DEPLOY.rglob("*.yml"))]


@lru_cache
def _load_all(path: Path) -> tuple:
    return tuple(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)


def _compose() -> dict:
    return _load_all(COMPOSE)[0]


def _k8s_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in _load_all(path)]


def _k8s(kind: str, name: str | None = None) -> list[dict]:
    return [doc for _, doc in _k8s_docs() if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]


def _one(kind: str, name: str | None = None) -> dict:
    found = _k8s(kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def _containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def _container(workload: dict) -> dict:
    containers = _containers(workload)
    assert len(containers) == 1, f"{workload['metadata']['name']}: expected one container"
    return containers[0]


def _api_deployment() -> dict:
    return next(d for d in _k8s("Deployment") if _container(d)["image"].split(":")[0].endswith("loftq-service-api"))


def _worker_deployment() -> dict:
    return next(d for d in _k8s("Deployment") if _container(d)["image"].split(":")[0].endswith("loftq-service-worker"))


@lru_cache
def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@lru_cache
def _settings_env_names() -> dict[str, str]:
    """Environment variable -> Settings field, read from the model (never hard-coded)."""
    from service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    names = {}
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else info.alias
        names[(alias or f"{prefix}{field}").upper()] = field
    return names


# --------------------------------------------------------------------------------------------
# Dockerfiles


@lru_cache
def _instructions(path: Path) -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments) with line continuations joined and comment lines dropped."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return tuple(out)


def _argv(args: str) -> list[str]:
    """Exec form (JSON array) or shell form."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def _build_args(path: Path) -> dict[str, str]:
    values = {}
    for keyword, args in _instructions(path):
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            values[name.strip()] = value.strip().strip('"')
    return values


def _expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def _base_image(path: Path) -> str:
    froms = [args for keyword, args in _instructions(path) if keyword == "FROM"]
    return _expand(froms[-1].split()[0], _build_args(path))


def _cmd(path: Path) -> list[str]:
    cmds = [args for keyword, args in _instructions(path) if keyword == "CMD"]
    assert cmds, f"{path.name} has no CMD"
    return _argv(cmds[-1])


def _user(path: Path) -> str:
    users = [args for keyword, args in _instructions(path) if keyword == "USER"]
    assert users, f"{path.name} runs as root (no USER)"
    return users[-1]


def _env(path: Path) -> dict[str, str]:
    env = {}
    for keyword, args in _instructions(path):
        if keyword == "ENV":
            for token in shlex.split(args):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def _shell_commands(text: str) -> list[list[str]]:
    """Simple commands of a shell snippet, split on &&, ||, ; and |."""
    commands: list[list[str]] = [[]]
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&"}:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _pip_installs(path: Path) -> list[list[str]]:
    """The requirement arguments of every ``pip install`` in the Dockerfile's RUN lines."""
    installs = []
    for keyword, args in _instructions(path):
        if keyword != "RUN":
            continue
        for command in _shell_commands(args):
            words = command[1:] if command[0] in {"python", "python3", "python3.11"} and command[1:2] == ["-m"] else command
            words = words[1:] if words[:1] == ["-m"] else words
            if words[:2] != ["pip", "install"]:
                continue
            requirements, skip = [], False
            for word in words[2:]:
                if skip:
                    skip = False
                elif word in {"--index-url", "-i", "--extra-index-url", "-r", "-c", "--constraint", "--requirement"}:
                    skip = True
                elif not word.startswith("-"):
                    requirements.append(word)
            installs.append(requirements)
    return installs


def _copy_sources(path: Path) -> list[str]:
    sources = []
    for keyword, args in _instructions(path):
        if keyword not in {"COPY", "ADD"}:
            continue
        words = [w for w in _argv(args) if not w.startswith("--")]
        if any(w.startswith("--from") for w in _argv(args)):
            continue
        sources.extend(words[:-1])
    return sources


def _dockerignore_excludes(ignore: Path, relpath: str) -> bool:
    """Docker's rule: a pattern matching the path or one of its parent directories applies, the
    last one that applies decides, and ``!`` re-includes."""
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]

    def matches(path: str, pattern: str) -> bool:
        if pattern.startswith("**/"):
            segments = path.split("/")
            return any(fnmatch.fnmatchcase("/".join(segments[i:]), pattern[3:]) for i in range(len(segments)))
        return fnmatch.fnmatchcase(path, pattern)

    excluded = False
    for raw in ignore.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip().strip("/")
        if any(matches(p, pattern) for p in prefixes):
            excluded = not negate
    return excluded


# --------------------------------------------------------------------------------------------
# Commands run by the deployment


def _compose_argvs(service: dict) -> list[list[str]]:
    argvs = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if value:
            argvs.append(value if isinstance(value, list) else shlex.split(value))
    test = service.get("healthcheck", {}).get("test")
    if isinstance(test, list) and test and test[0] in {"CMD", "CMD-SHELL"}:
        argvs.append(test[1:] if test[0] == "CMD" else shlex.split(test[1]))
    return argvs


def _k8s_argvs(container: dict) -> list[list[str]]:
    argvs = [container.get("command", []) + container.get("args", [])]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        argvs.append(container.get(probe, {}).get("exec", {}).get("command", []))
    return [a for a in argvs if a]


def _readme_commands() -> list[list[str]]:
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", README.read_text(), re.S):
        text = "\n".join(line for line in block.replace("\\\n", " ").splitlines() if not line.strip().startswith("#"))
        for line in text.splitlines():
            line = line.split(" #")[0]
            commands.extend(_shell_commands(line))
    return [[w for w in c if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)] or c for c in commands]


@lru_cache
def _all_argvs() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(where, argv) of everything the containers of our images run, plus the README commands."""
    found = []
    for path in DOCKERFILES:
        found.append((path.name, _cmd(path)))
        for keyword, args in _instructions(path):
            if keyword == "ENTRYPOINT":
                found.append((path.name, _argv(args)))
            if keyword == "HEALTHCHECK" and " CMD " in f" {args} ":
                found.append((f"{path.name} HEALTHCHECK", _argv(args.split("CMD", 1)[1].strip())))
    for name, service in _compose()["services"].items():
        if "build" in service:
            found += [(f"docker-compose.yml {name}", argv) for argv in _compose_argvs(service)]
    for _, doc in _k8s_docs():
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            for container in _containers(doc):
                if container["image"].split(":")[0].split("/")[-1] in OUR_IMAGES:
                    found += [(f"k8s {doc['metadata']['name']}", argv) for argv in _k8s_argvs(container)]
    found += [("deploy/README.md", argv) for argv in _readme_commands()]
    return tuple((where, tuple(argv)) for where, argv in found)


def _programs() -> list[str]:
    return sorted({argv[0] for _, argv in _all_argvs() if argv[0] not in EXTERNAL_PROGRAMS})


def _module_paths() -> list[str]:
    paths = set()
    for _, argv in _all_argvs():
        for i, word in enumerate(argv):
            if MODULE_PATH.match(word):
                paths.add(word)
            elif word in {"-A", "--app"} and i + 1 < len(argv):
                paths.add(argv[i + 1])
            elif word.startswith("--app="):
                paths.add(word.split("=", 1)[1])
            elif word == "-m" and argv[0].startswith("python") and i + 1 < len(argv):
                paths.add(argv[i + 1])
    return sorted(paths)


def _declared_dependencies() -> dict[str, Requirement]:
    project = _pyproject()["project"]
    own = canonicalize_name(project["name"])
    declared = {}
    for spec in [*project.get("dependencies", []), *(s for group in project.get("optional-dependencies", {}).values() for s in group)]:
        requirement = Requirement(spec)
        if canonicalize_name(requirement.name) != own:
            declared.setdefault(canonicalize_name(requirement.name), requirement)
    return declared


@lru_cache
def _import_probe(module: str, attr: str | None, blocked: tuple[str, ...] = ()) -> dict:
    """Imports ``module`` in a fresh interpreter (conftest has already imported torch here) and
    reports the attribute, the heavy modules it pulled in and whether its routes (if it is an
    ASGI app with a router) answer a GET on each of ``PROBE_PATHS``. Top-level modules in
    ``blocked`` fail to import there, as they would in an image that lacks them (optional imports
    guarded by ``except ImportError`` still work)."""
    code = f"""
import importlib, json, sys

BLOCKED = frozenset({sorted(blocked)!r})

class NotInImage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (its distribution is not installed in the image)", name=name)
        return None

sys.meta_path.insert(0, NotInImage())
mod = importlib.import_module({module!r})
obj = getattr(mod, {attr!r}, None) if {attr!r} else mod

def served(path):
    from starlette.routing import Match

    scope = {{"type": "http", "method": "GET", "path": path, "root_path": "", "headers": [], "query_string": b""}}
    return any(route.matches(scope)[0] != Match.NONE for route in obj.router.routes)

print(json.dumps({{
    "has_attr": obj is not None,
    "heavy": sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules),
    "served": {{path: served(path) for path in {list(PROBE_PATHS)!r}}} if hasattr(obj, "router") else {{}},
}}))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _find_spec(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ModuleNotFoundError, ValueError):  # a parent package is missing
        return None


# --------------------------------------------------------------------------------------------
# Every YAML parses


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert [d for d in docs if d is not None], f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs if d is not None)


# --------------------------------------------------------------------------------------------
# LOFTQ_* variables


def _named_loftq_variables() -> list[str]:
    files = [COMPOSE, *(p for p in DEPLOY.rglob("*") if p.is_file())]
    return sorted({name for path in files for name in LOFTQ_NAME.findall(path.read_text())})


def test_deployment_names_settings_variables() -> None:
    assert len(_named_loftq_variables()) >= 5, "expected the deployment files to set LOFTQ_* settings"


@pytest.mark.parametrize("name", _collect(_named_loftq_variables))
def test_loftq_variable_is_a_settings_field(name: str) -> None:
    names = _settings_env_names()
    assert name in names, f"{name} (named in the deployment files) is no field of service.settings.Settings; fields: {sorted(names)}"


def _resolve_interpolation(value: str) -> str:
    """Compose's ${VAR:-default} with the default (the deployment must work with no .env)."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def _env_sets() -> dict[str, dict[str, str]]:
    services = _compose()["services"]
    configmap = _one("ConfigMap")["data"]
    worker = _container(_worker_deployment())
    sets = {
        f"compose {name}": {k: _resolve_interpolation(str(v)) for k, v in services[name]["environment"].items()}
        for name in ("api", "worker")
    }
    sets["k8s api"] = dict(configmap)
    sets["k8s worker"] = {**configmap, **{e["name"]: e["value"] for e in worker.get("env", []) if "value" in e}}
    for path in DOCKERFILES:
        sets[path.name] = _env(path)
    return sets


@pytest.mark.parametrize("where", ["compose api", "compose worker", "k8s api", "k8s worker", *(p.name for p in DOCKERFILES)])
def test_settings_values_validate(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings

    env = {k: v for k, v in _env_sets()[where].items() if k.startswith(PREFIX)}
    for name in [n for n in os.environ if n.upper().startswith(PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    for name in env:
        assert name in _settings_env_names(), f"{where}: {name} is no Settings field"
    if where.startswith(("compose", "k8s")):
        assert settings.storage == "s3", f"{where}: the deployment stores artifacts in S3"


def test_compose_api_and_worker_share_the_service_settings() -> None:
    services = _compose()["services"]
    api, worker = services["api"]["environment"], services["worker"]["environment"]
    for name in ("LOFTQ_REDIS_URL", "LOFTQ_STORAGE", "LOFTQ_S3_BUCKET", "LOFTQ_S3_ENDPOINT_URL",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "LOFTQ_ALLOWED_FILE_ROOTS"):
        assert name in api, f"compose api lacks {name}"
        assert worker.get(name) == api[name], f"compose worker's {name} differs from the api's"
    assert api["LOFTQ_STORAGE"] == "s3"
    assert json.loads(api["LOFTQ_ALLOWED_FILE_ROOTS"]) == ["/models"]


# --------------------------------------------------------------------------------------------
# Commands, console scripts and module paths


def test_commands_were_found() -> None:
    programs = {argv[0] for _, argv in _all_argvs()}
    assert "celery" in programs
    assert {"api.server", "worker.celery_app:celery_app"} <= set(_module_paths())


@pytest.mark.parametrize("program", _collect(_programs))
def test_console_script_exists(program: str) -> None:
    """Ours in [project.scripts] (with an importable target), or a declared dependency's own."""
    scripts = _pyproject()["project"].get("scripts", {})
    where = sorted({w for w, argv in _all_argvs() if argv[0] == program})
    if program.startswith("loftq"):
        assert program in scripts, f"{program} (run by {where}) is not in pyproject.toml [project.scripts]"
        module, _, attr = scripts[program].partition(":")
        assert _find_spec(module) is not None, f"{program} -> {scripts[program]}: module {module} not found"
        return
    if program in scripts:
        return
    owners = {canonicalize_name(ep.dist.name) for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == program and ep.dist}
    assert owners, f"{program} (run by {where}) is neither in [project.scripts] nor an installed package's console script"
    declared = _declared_dependencies()
    assert owners & set(declared), f"{program} comes from {sorted(owners)}, which pyproject.toml does not declare"


@pytest.mark.parametrize("path", _collect(_module_paths))
def test_module_path_importable(path: str) -> None:
    module, _, attr = path.partition(":")
    assert _find_spec(module) is not None, f"module {module} (from {path!r}) does not exist"
    probe = _import_probe(module, attr or None)
    assert "error" not in probe, f"importing {module} failed: {probe.get('error')}"
    assert probe["has_attr"], f"{module} has no attribute {attr!r}"


def _api_module_path() -> str:
    """The app the API image serves: its command is the launcher, which serves ``API_APP``."""
    assert _cmd(API_DOCKERFILE) == API_COMMAND
    return API_APP


def test_api_serves_the_probe_paths() -> None:
    """The paths the probes and the HEALTHCHECK hit are routes of the app uvicorn serves."""
    api = _container(_api_deployment())
    probes = {api["readinessProbe"]["httpGet"]["path"], api["livenessProbe"]["httpGet"]["path"]}
    healthcheck = " ".join(args for k, args in _instructions(API_DOCKERFILE) if k == "HEALTHCHECK")
    probes |= set(re.findall(r"https?://[^/'\"]+(/[\w/-]*)", healthcheck))
    assert probes == set(PROBE_PATHS)
    module, _, attr = _api_module_path().partition(":")
    assert _find_spec(module) is not None, f"module {module} does not exist"
    probe = _import_probe(module, attr)
    assert "error" not in probe, f"importing {module} failed: {probe.get('error')}"
    missing = sorted(path for path in probes if not probe["served"].get(path))
    assert not missing, f"{_api_module_path()} has no route for {missing}"


def _requirement_closure(requirements: list[Requirement]) -> set[str]:
    """Installed distributions the requirements pull in, transitively, extras included."""
    seen: set[str] = set()
    todo = [(canonicalize_name(r.name), set(r.extras)) for r in requirements]
    while todo:
        name, extras = todo.pop()
        key = name + "[" + ",".join(sorted(extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for spec in dist.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((canonicalize_name(requirement.name), set(requirement.extras)))
    return {key.split("[")[0] for key in seen}


def _api_image_requirements() -> list[Requirement]:
    return [Requirement(r) for install in _pip_installs(API_DOCKERFILE) for r in install if r != "."]


def _not_in_api_image() -> tuple[str, ...]:
    """Top-level modules of the installed distributions that the API image does not install:
    neither its explicit pip list nor what that list pulls in, nor the project itself."""
    allowed = _requirement_closure(_api_image_requirements()) | {canonicalize_name(_pyproject()["project"]["name"])}
    stdlib = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    blocked = set()
    for top, dists in importlib.metadata.packages_distributions().items():
        if top not in stdlib and not {canonicalize_name(d) for d in dists} & allowed:
            blocked.add(top)
    return tuple(sorted(blocked))


def test_api_module_imports_only_what_the_api_image_installs() -> None:
    """The API image has no torch: the API app must import with only the API image's explicit
    dependency list (and what it pulls in) installed."""
    module, _, attr = _api_module_path().partition(":")
    assert _find_spec(module) is not None, f"module {module} does not exist"
    blocked = _not_in_api_image()
    assert "torch" in blocked
    probe = _import_probe(module, attr, blocked)
    assert "error" not in probe, (
        f"importing {module} with only the API image's packages failed: {probe.get('error')} "
        "(keep the API torch-free, or add the package to the pip install list in deploy/api.Dockerfile)")
    assert not probe["heavy"], f"importing {module} imports {probe['heavy']}, which the API image does not install"
    launcher = _import_probe("api.server", "main", blocked)
    assert "error" not in launcher and launcher["has_attr"], f"importing api.server in the API image fails: {launcher}"
    assert not launcher["heavy"], f"api.server imports {launcher['heavy']}, which the API image does not install"


# --------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copy_sources_exist(path: Path) -> None:
    sources = _copy_sources(path)
    assert sources, f"{path.name} copies nothing"
    ignore = path.with_name(path.name + ".dockerignore")
    for source in sources:
        assert list(REPO.glob(source)), f"{path.name}: COPY source {source} is not in the repository (the build context is the repo root)"
        if ignore.exists():
            assert not _dockerignore_excludes(ignore, source), f"{path.name}: {source} is excluded by {ignore.name}"


def test_dockerignore_keeps_the_rest_out() -> None:
    for path in DOCKERFILES:
        ignore = path.with_name(path.name + ".dockerignore")
        assert ignore.exists(), f"{ignore.name} missing"
        for other in (".git", "tests", ".venv", "loftq-data", "api/__pycache__"):
            assert _dockerignore_excludes(ignore, other), f"{ignore.name} lets {other} into the build context"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_non_root(path: Path) -> None:
    user = _user(path).split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "numeric USER, so Kubernetes runAsNonRoot can verify it"


def test_api_dockerfile() -> None:
    assert _base_image(API_DOCKERFILE) == "python:3.11-slim"
    installs = _pip_installs(API_DOCKERFILE)
    assert ["."] in installs, "the project goes in with `pip install --no-deps .`"
    assert any("--no-deps ." in args for k, args in _instructions(API_DOCKERFILE) if k == "RUN")
    requirements = _api_image_requirements()
    names = {canonicalize_name(r.name) for r in requirements}
    assert "torch" not in names
    assert names >= {"fastapi", "uvicorn", "celery", "redis", "boto3", "httpx", "pydantic", "pydantic-settings",
                     "prometheus-client", "typer", "rich"}
    declared = _declared_dependencies()
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in declared, f"api.Dockerfile installs {name}, which pyproject.toml does not declare"
        assert requirement.specifier == declared[name].specifier, (
            f"api.Dockerfile pins {requirement}, pyproject.toml declares {declared[name]}")
        assert requirement.extras <= declared[name].extras
    assert _cmd(API_DOCKERFILE) == API_COMMAND
    assert any(k == "HEALTHCHECK" and "/healthz" in args for k, args in _instructions(API_DOCKERFILE))


def test_the_api_starts_through_its_launcher_everywhere() -> None:
    """Compose and Kubernetes run the image's command (the request timeouts and limits live there)."""
    assert _compose()["services"]["api"].get("command", API_COMMAND) == API_COMMAND
    api = _container(_api_deployment())
    assert api.get("command", API_COMMAND) + api.get("args", []) == API_COMMAND


def test_worker_dockerfile() -> None:
    assert _base_image(WORKER_DOCKERFILE).startswith("nvidia/cuda:") and "runtime" in _base_image(WORKER_DOCKERFILE)
    text = WORKER_DOCKERFILE.read_text()
    assert "python3.11" in text
    assert "TORCH_INDEX_URL" in _build_args(WORKER_DOCKERFILE)
    installs = _pip_installs(WORKER_DOCKERFILE)
    torch_install = next(i for i in installs if any(canonicalize_name(Requirement(_expand(r, _build_args(WORKER_DOCKERFILE))).name) == "torch" for r in i if r != "."))
    assert torch_install
    assert any("--index-url" in args and "TORCH_INDEX_URL" in args for k, args in _instructions(WORKER_DOCKERFILE) if k == "RUN")
    project = next(r for i in installs for r in i if r.startswith(".["))
    extras = set(project[2:-1].split(","))
    assert extras == {"service", "bnb"}
    assert extras <= set(_pyproject()["project"]["optional-dependencies"])
    assert _cmd(WORKER_DOCKERFILE) == ["celery", "-A", "worker.celery_app:celery_app", "worker", "--loglevel=INFO",
                                       "--concurrency=1", "--pool=prefork", "-Q", "loftq"]


# --------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_services() -> None:
    services = _compose()["services"]
    assert {"redis", "minio", "minio-init", "api", "worker"} <= set(services)
    assert services["api"]["build"]["dockerfile"] == "deploy/api.Dockerfile"
    assert services["worker"]["build"]["dockerfile"] == "deploy/worker.Dockerfile"
    for name in ("api", "worker"):
        build = services[name]["build"]
        assert (REPO / build["context"]).resolve() == REPO, f"{name}: the build context must be the repo root"
        assert (REPO / build["context"] / build["dockerfile"]).is_file()
    port = _cmd(API_DOCKERFILE)[_cmd(API_DOCKERFILE).index("--port") + 1]
    assert any(str(p).endswith(f":{port}") for p in services["api"]["ports"])


def test_compose_worker_reserves_one_nvidia_gpu() -> None:
    devices = _compose()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["count"] == 1
    assert "gpu" in devices[0]["capabilities"]


def _appendonly(argv: list[str]) -> bool:
    return any(a == "--appendonly" and b == "yes" for a, b in zip(argv, argv[1:]))


def test_compose_redis_is_persistent() -> None:
    redis = _compose()["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"] if isinstance(redis["command"], list) else shlex.split(redis["command"])
    assert _appendonly(command)
    assert any(str(v).split(":")[1] == "/data" for v in redis["volumes"])
    assert "healthcheck" in redis


def test_compose_dependencies_wait_for_health() -> None:
    compose = _compose()
    services = compose["services"]
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["minio-init"]["condition"] == "service_completed_successfully"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy, which has no healthcheck"
    named = {str(v).split(":")[0] for s in services.values() for v in s.get("volumes", []) if not str(v).startswith((".", "/"))}
    assert named <= set(compose.get("volumes") or {}), "named volumes must be declared"


def test_compose_minio_init_creates_the_bucket() -> None:
    services = _compose()["services"]
    init = services["minio-init"]
    script = " ".join(init.get("entrypoint", []) + (init.get("command") or []))
    bucket = services["api"]["environment"]["LOFTQ_S3_BUCKET"]
    assert re.search(rf"mc mb\b[^&;]*\b\w+/{re.escape(bucket)}\b", script), f"minio-init does not `mc mb` the bucket {bucket}"
    endpoint = services["api"]["environment"]["LOFTQ_S3_ENDPOINT_URL"]
    assert endpoint.rstrip("/") in script, "minio-init must talk to the endpoint the services use"


# --------------------------------------------------------------------------------------------
# Kubernetes


def test_k8s_documents_are_well_formed() -> None:
    for path, doc in _k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path.name


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _load_all(K8S / "kustomization.yaml")[0]
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert kustomization["namespace"] == _one("Namespace")["metadata"]["name"]
    for name in ("namespace.yaml", "configmap.yaml", "secret.yaml", "redis.yaml", "api.yaml", "worker.yaml",
                 "worker-scaledobject.yaml"):
        assert name in listed


def test_k8s_env_sources_exist() -> None:
    configmaps = {d["metadata"]["name"] for d in _k8s("ConfigMap")}
    secrets = {d["metadata"]["name"] for d in _k8s("Secret")}
    for deployment in (_api_deployment(), _worker_deployment()):
        env_from = _container(deployment)["envFrom"]
        used_maps = {e["configMapRef"]["name"] for e in env_from if "configMapRef" in e}
        used_secrets = {e["secretRef"]["name"] for e in env_from if "secretRef" in e}
        assert used_maps and used_maps <= configmaps
        assert used_secrets and used_secrets <= secrets
    secret = _one("Secret", "loftq-s3")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])


def test_k8s_api_keys_reach_the_api_only_and_the_placeholder_opens_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings
    from service.tenants import hash_key

    keys = _one("Secret", "loftq-api-keys")["stringData"]["LOFTQ_API_KEYS"]
    monkeypatch.setenv("LOFTQ_API_KEYS", keys)
    configured = Settings().api_keys
    assert configured, "the API would run open"
    assert hash_key("REPLACE_ME") not in configured and hash_key("") not in configured
    refs = lambda d: {e["secretRef"]["name"] for e in _container(d)["envFrom"] if "secretRef" in e}  # noqa: E731
    assert "loftq-api-keys" in refs(_api_deployment()) and "loftq-api-keys" not in refs(_worker_deployment())


def test_compose_api_is_open_only_on_loopback() -> None:
    api = _compose()["services"]["api"]
    assert "LOFTQ_API_KEYS" in api["environment"]
    published = [_resolve_interpolation(str(p)) for p in api["ports"]]
    assert published and all(p.startswith("127.0.0.1:") for p in published), published
    assert all(k.startswith(PREFIX) for k in _one("ConfigMap")["data"])


def test_k8s_services_select_their_pods() -> None:
    workloads = _k8s("Deployment") + _k8s("StatefulSet")
    for service in _k8s("Service"):
        selector = service["spec"]["selector"]
        matches = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert matches, f"Service {service['metadata']['name']} selects no pods"
        ports = {p.get("name") for c in _containers(matches[0]) for p in c.get("ports", [])}
        ports |= {p["containerPort"] for c in _containers(matches[0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in ports
    for workload in workloads:
        assert workload["spec"]["selector"]["matchLabels"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_api() -> None:
    api = _api_deployment()
    assert api["spec"]["replicas"] == 2
    container = _container(api)
    port = int(_cmd(API_DOCKERFILE)[_cmd(API_DOCKERFILE).index("--port") + 1])
    assert port in {p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_k8s_worker_requests_one_gpu() -> None:
    worker = _worker_deployment()
    pod = worker["spec"]["template"]["spec"]
    resources = _container(worker)["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources.get("requests", {}).get("nvidia.com/gpu", 1)) == 1
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])
    command = _container(worker).get("command", []) + _container(worker).get("args", [])
    assert not command or "--concurrency=1" in command, "one job per pod"


def test_k8s_worker_grace_outlasts_a_job() -> None:
    """Scale-in sends SIGTERM; Celery's warm shutdown finishes the running job within the grace."""
    from service.settings import Settings

    configmap = _one("ConfigMap")["data"]
    timeout = int(configmap.get("LOFTQ_JOB_TIMEOUT_SECONDS", Settings.model_fields["job_timeout_seconds"].default))
    grace = _worker_deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > timeout


def test_k8s_redis_is_persistent() -> None:
    redis = _one("StatefulSet")
    container = _container(redis)
    assert _appendonly(container.get("command", []) + container.get("args", []))
    claims = {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert claims & set(mounts) and "/data" in mounts.values()


def test_queue_name_is_the_same_everywhere() -> None:
    """The worker's -Q, LOFTQ_QUEUE (Compose, ConfigMap, else the Settings default) and the list
    KEDA watches must all name the same Celery queue."""
    from service.settings import Settings

    default = Settings.model_fields["queue"].default
    cmd = _cmd(WORKER_DOCKERFILE)
    queue = cmd[cmd.index("-Q") + 1]
    assert _compose()["services"]["worker"]["environment"].get("LOFTQ_QUEUE", default) == queue
    assert _one("ConfigMap")["data"].get("LOFTQ_QUEUE", default) == queue
    scaled = _one("ScaledObject")
    assert {t["metadata"]["listName"] for t in scaled["spec"]["triggers"]} == {queue}


def test_keda_scales_the_worker_on_the_broker() -> None:
    scaled = _one("ScaledObject")
    spec = scaled["spec"]
    assert scaled["apiVersion"].startswith("keda.sh/")
    assert spec["scaleTargetRef"]["name"] == _worker_deployment()["metadata"]["name"]
    assert spec.get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment"
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] == 8
    assert "replicas" not in _worker_deployment()["spec"], "KEDA owns the worker's replica count"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis"
    redis_url = _one("ConfigMap")["data"]["LOFTQ_REDIS_URL"]
    match = re.match(r"redis://(?P<host>[^:/]+):(?P<port>\d+)/(?P<db>\d+)", redis_url)
    assert match, redis_url
    host, _, port = trigger["metadata"]["address"].partition(":")
    namespace = _one("Namespace")["metadata"]["name"]
    assert host in {match["host"], f"{match['host']}.{namespace}.svc.cluster.local"}
    assert port == match["port"]
    assert str(trigger["metadata"].get("databaseIndex", "0")) == match["db"]
    assert _one("Service", match["host"])
