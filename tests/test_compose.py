"""The deployment files: compose.yaml, .env.example, the Dockerfiles and their entrypoint.

``docker-compose config`` (Debian's docker-compose package, which scripts/setup-system
installs) and the compose specification's JSON schema (the copy that package ships) must
both accept compose.yaml. The images cannot be built without registry access for their base
images, so the Dockerfiles are checked for what can be checked offline: pinned bases, a
non-root user, sources that exist and are not excluded from the build context, pinned
dependencies. The entrypoint runs for real against the test model cache.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kernel.settings import Settings
from tests.conftest import REPO_ROOT, require

COMPOSE_FILE = REPO_ROOT / "compose.yaml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DOCKERFILES = (REPO_ROOT / "docker" / "Dockerfile", REPO_ROOT / "docker" / "Dockerfile.cuda")
ENTRYPOINT = REPO_ROOT / "docker" / "entrypoint.sh"
#: Where Debian's docker-compose package keeps the compose specification's schema.
SCHEMA_CANDIDATES = (
    Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json"),
    Path("/usr/local/lib/python3/dist-packages/compose/config/compose_spec.json"),
)
SERVICES = {"redis", "postgres", "web", "bot", "worker-gpu", "worker-cpu", "beat", "mailpit"}
#: A password for the checks; the real one lives in a deployment's .env only.
TEST_PASSWORD = "ci0only0password"


def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            values[match.group(1)] = match.group(2)
    return values


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def _project(tmp_path: Path, password: str | None) -> Path:
    """A copy of the deployment files, as an operator has them: compose.yaml and .env from the example."""
    shutil.copy(COMPOSE_FILE, tmp_path / "compose.yaml")
    env = ENV_EXAMPLE.read_text()
    if password is not None:
        env = env.replace("\nPOSTGRES_PASSWORD=\n", f"\nPOSTGRES_PASSWORD={password}\n")
    (tmp_path / ".env").write_text(env)
    return tmp_path


def _run_config(project: Path) -> subprocess.CompletedProcess[str]:
    command = _compose_command()
    require(command is not None, "needs docker-compose (apt install docker-compose; scripts/setup-system does)")
    assert command is not None
    env = {key: value for key, value in os.environ.items() if key != "POSTGRES_PASSWORD"}
    return subprocess.run([*command, "--project-directory", str(project), "-f", str(project / "compose.yaml"),
                           "config", "-q"], capture_output=True, text=True, cwd=project, env=env, timeout=120)


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    completed = _run_config(_project(tmp_path, TEST_PASSWORD))
    assert completed.returncode == 0, completed.stderr


def test_docker_compose_config_refuses_to_run_without_a_database_password(tmp_path: Path) -> None:
    completed = _run_config(_project(tmp_path, None))
    assert completed.returncode != 0
    assert "POSTGRES_PASSWORD" in completed.stderr


def _schema() -> dict[str, Any]:
    path = next((p for p in SCHEMA_CANDIDATES if p.is_file()), None)
    require(path is not None, "needs the compose specification's schema from Debian's docker-compose package "
                              "(apt install docker-compose; scripts/setup-system does)")
    assert path is not None
    import json

    loaded = json.loads(path.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _schema_errors(document: dict[str, Any]) -> list[str]:
    schema = _schema()
    # The schema names draft 2019-09 by an old URL that jsonschema does not recognise.
    validator = jsonschema.Draft201909Validator(schema, format_checker=jsonschema.Draft201909Validator.FORMAT_CHECKER)
    return [f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
            for error in validator.iter_errors(document)]


def test_compose_specification_schema_accepts_the_file() -> None:
    assert _schema_errors(_compose()) == []


def test_compose_specification_schema_catches_mistakes() -> None:
    named = {"name": "classlens", **_compose()}
    assert _schema_errors(named), "a top-level name: must be rejected (older compose implementations refuse it)"
    misspelt = copy.deepcopy(_compose())
    misspelt["services"]["web"]["healthchek"] = misspelt["services"]["web"].pop("healthcheck")
    assert any("healthchek" in error for error in _schema_errors(misspelt))


def test_services_health_checks_restart_policies_and_volumes() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
    for name in ("redis", "postgres", "web", "mailpit"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    # Services that need the store and the broker wait until both are healthy.
    for name in ("web", "bot", "worker-gpu", "worker-cpu", "beat"):
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == depends["postgres"]["condition"] == "service_healthy", name
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    for name in ("web", "bot", "worker-gpu", "worker-cpu"):
        assert "model-cache:/var/cache/classlens/models" in services[name]["volumes"], name
    assert set(compose["volumes"]) >= {"postgres-data", "model-cache", "redis-data", "classlens-data"}
    assert services["mailpit"]["profiles"] == ["dev"]
    assert all("profiles" not in service for name, service in services.items() if name != "mailpit")


def test_gpu_worker_reserves_an_nvidia_gpu_and_runs_the_cuda_image() -> None:
    worker = _compose()["services"]["worker-gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert worker["environment"]["CLASSLENS_EXECUTION_PROVIDER"] == "cuda"
    assert worker["command"][:4] == ["classlens", "worker", "--queues", "gpu"]


def test_no_secret_is_written_in_the_compose_file() -> None:
    text = COMPOSE_FILE.read_text()
    for line in text.splitlines():
        match = re.match(r"^\s*[A-Z_]*(PASSWORD|SECRET|TOKEN)[A-Z_]*:\s*(\S+)", line)
        if match:
            assert match.group(2).startswith("${"), line
    assert re.search(r"://[^:@/\s]+:(?!\$\{)[^@\s]+@", text) is None, "a URL with a literal password"
    # The example .env leaves every secret empty (or commented out).
    env = _env_example()
    for key, value in env.items():
        if re.search(r"PASSWORD|SECRET", key):
            assert value == "", key


def test_every_variable_is_documented_in_the_env_example_and_every_setting_exists() -> None:
    env = _env_example()
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    assert used <= set(env), f".env.example lacks {sorted(used - set(env))}"
    # .env reaches the containers: a CLASSLENS_ name that is no setting would stop ClassLens at start.
    fields = {name.upper() for name in Settings.model_fields}
    unknown = [key for key in env if key.startswith("CLASSLENS_") and key.removeprefix("CLASSLENS_") not in fields]
    assert unknown == []
    # The example says where emotion recognition must be off, and the file makes the operator choose.
    assert env["CLASSLENS_EMOTION_INFERENCE"] == "false"
    assert "Art. 5(1)(f)" in ENV_EXAMPLE.read_text()


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_service_runs_a_command_the_cli_has(service: str) -> None:
    from typer.main import get_command

    from classlens.cli import app

    command = _compose()["services"][service].get("command")
    if not command or command[0] != "classlens":
        assert service in {"redis", "postgres", "mailpit"}
        return
    node: Any = get_command(app)
    for word in command[1:]:
        commands = getattr(node, "commands", None)
        if word.startswith("-") or commands is None:
            break
        assert word in commands, f"service {service}: `classlens {' '.join(command[1:])}`: no command {word!r}"
        node = commands[word]


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _dockerignored(relative: str) -> bool:
    """Whether the build context leaves ``relative`` out (.dockerignore: '*' then '!' exceptions)."""
    included = False
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if pattern == "*" or relative == pattern or relative.startswith(pattern + "/"):
            included = negate
    return not included


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_its_base_runs_as_a_user_and_copies_what_exists(dockerfile: Path) -> None:
    instructions = _dockerfile_instructions(dockerfile)
    args = dict(re.match(r"([A-Z_]+)=(\S+)", rest).groups()  # type: ignore[union-attr]
                for keyword, rest in instructions if keyword == "ARG" and "=" in rest)
    bases = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    assert bases
    for base in bases:
        image = args.get(base.strip("${}"), base)
        _, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{dockerfile.name}: unpinned base {image}"
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{dockerfile.name} must end as a non-root user"
    for keyword, rest in instructions:
        if keyword != "COPY" or "--from=" in rest:
            continue
        sources = [word for word in rest.split()[:-1] if not word.startswith("--")]
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
            assert not _dockerignored(source), f"{dockerfile.name}: COPY {source} is excluded by .dockerignore"
    assert ("ENTRYPOINT", '["classlens-entrypoint"]') in instructions
    # Every package the wheel is built from goes into the image.
    import tomllib

    included = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    copied = {rest.split()[0] for keyword, rest in instructions if keyword == "COPY" and "--from=" not in rest}
    packages = {pattern.rstrip("*") for pattern in included["include"]}
    assert packages <= copied, f"{dockerfile.name} does not COPY {sorted(packages - copied)}"


def test_image_dependencies_are_pinned_for_every_runtime_requirement() -> None:
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (REPO_ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    for requirement in project["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower())
        assert name in pins, f"docker/constraints.txt does not pin {name}"


@pytest.mark.media
def test_entrypoint_puts_the_configured_models_in_the_cache_then_runs_the_command(
    tmp_path: Path, default_models: Path
) -> None:
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("CLASSLENS_")}
    bin_dir = str(Path(sys.executable).parent)
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '')}", CLASSLENS_MODEL_CACHE_DIR=str(default_models),
               CLASSLENS_DATA_DIR=str(tmp_path / "data"), CLASSLENS_EMOTION_INFERENCE="false")
    completed = subprocess.run(["sh", str(ENTRYPOINT), "classlens", "version"], capture_output=True, text=True,
                               env=env, cwd=tmp_path, timeout=300)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    # The configured models (emotion off: no emotion model, and the engagement model that reads
    # no expressions; the default recogniser), then the command's own output.
    assert [line.split(":")[0] for line in lines[:-1]] == ["retinaface-mnet025", "engagement-baseline-v1",
                                                            "face-api-recognition"]
    from classlens import __version__

    assert lines[-1] == __version__
    # A cache that cannot be filled (no such model source offline) fails the start with exit code 3,
    # and the command does not run.
    env.update(CLASSLENS_MODEL_CACHE_DIR=str(tmp_path / "empty-cache"), CLASSLENS_PACKAGE_INDEX_URL="http://127.0.0.1:9/",
               CLASSLENS_LOCAL_MODELS_DIR=str(tmp_path))
    failed = subprocess.run(["sh", str(ENTRYPOINT), "classlens", "version"], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert failed.returncode == 3, failed.stderr
    assert __version__ not in failed.stdout and "could not put the models" in failed.stderr
    # Services that run no model skip the pull.
    env["SKIP_MODEL_PULL"] = "1"
    skipped = subprocess.run(["sh", str(ENTRYPOINT), "classlens", "version"], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=300)
    assert skipped.returncode == 0 and skipped.stdout.strip() == __version__
