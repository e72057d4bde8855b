"""Static checks of docker/ (no Docker engine here): what the Dockerfiles and compose files
reference exists, every image installs with the Makefile's recipe, and the health check probes a
real route."""

from __future__ import annotations

import re
import shlex
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
COMPOSE_FILES = sorted(DOCKER.glob("compose*.yaml"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    return yaml.safe_load(args) if args.startswith("[") else shlex.split(args)


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


def test_there_are_cpu_gpu_and_trainer_images():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.trainer"}
    assert (DOCKER / "compose.yaml") in COMPOSE_FILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_are_not_ignored(dockerfile):
    copies = [args for word, args in instructions(dockerfile) if word in ("COPY", "ADD")]
    assert copies, "the image must copy the repository"
    ignored = dockerignore()
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        assert not any(p.startswith("--from") for p in shlex.split(args))
        for source in parts[:-1]:
            assert (ROOT / source).exists(), source
    for needed in ("Makefile", "pyproject.toml", "iro", "server", "clients", "docker"):
        assert needed not in ignored and (ROOT / needed).exists()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_each_image_installs_with_make_setup(dockerfile):
    steps = instructions(dockerfile)
    runs = [args for word, args in steps if word == "RUN"]
    setup = [r for r in runs if re.search(r"\bmake setup\b", r)]
    assert len(setup) == 1, "install with the Makefile's recipe, once"
    assert not any(re.search(r"\bpip3? install\b", r) for r in runs), "no install steps besides `make setup`"
    extras = re.search(r"EXTRAS=(\S+)", setup[0]).group(1)
    if extras.startswith("${"):  # an ARG: check its default
        arg = extras.strip("${}")
        extras = next(a.split("=", 1)[1] for w, a in steps if w == "ARG" and a.startswith(f"{arg}="))
    assert set(extras.split(",")) <= set(PYPROJECT["project"]["optional-dependencies"]), extras
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^EXTRAS \?=", makefile, re.M) and re.search(r"^setup:", makefile, re.M)
    assert "'.[$(EXTRAS)]'" in makefile  # the recipe installs the extras the image asks for
    assert any(re.search(r"apt-get install[^&]*\bmake\b", r) for r in runs), "the base image needs make"


def test_a_copied_venv_cannot_skip_the_install():
    assert ".venv" in dockerignore()  # the Makefile's stamp lives in .venv


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_commands_point_at_things_that_exist(dockerfile):
    steps = dict(instructions(dockerfile))  # last of each kind wins, as in Docker
    scripts = PYPROJECT["project"]["scripts"]
    launch = steps.get("ENTRYPOINT") or steps.get("CMD")
    program = exec_form(launch)[0]
    assert program.startswith("/app/.venv/bin/") and Path(program).name in {*scripts, "python"}, program
    if "CMD" in steps and "ENTRYPOINT" not in steps:
        assert exec_form(steps["CMD"])[1:3] == ["serve", "--host"]
    if "HEALTHCHECK" in steps:
        probe = exec_form(steps["HEALTHCHECK"].split("CMD", 1)[1].strip())
        assert probe[1] == "/app/docker/healthcheck.py" and (ROOT / "docker" / "healthcheck.py").exists()
    assert steps.get("WORKDIR") == "/app"


def test_serve_is_an_iro_command():
    from iro.cli import app

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert "serve" in names


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_builds_existing_dockerfiles(compose_file):
    spec = yaml.safe_load(compose_file.read_text())
    for name, service in spec["services"].items():
        build = service.get("build")
        if build is None:
            continue
        context = (compose_file.parent / build["context"]).resolve()
        assert context == ROOT, name
        assert (context / build["dockerfile"]).is_file(), (name, build["dockerfile"])


def test_compose_shares_the_value_registry_and_checks_health():
    spec = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = spec["services"]
    assert {"server", "trainer"} <= set(services)
    for name in ("server", "trainer"):
        service = services[name]
        assert "values:/values" in service["volumes"] and service["environment"]["IRO_VALUES_DIR"] == "/values"
        home = service["environment"]["IRO_HOME"]
        assert any(v.startswith("iro-home:") and v.endswith(f":{home}") for v in service["volumes"])
        for volume in service["volumes"]:
            assert volume.split(":")[0] in spec["volumes"], volume
    assert services["trainer"]["depends_on"]["server"]["condition"] == "service_healthy"
    assert services["trainer"]["environment"]["IRO_BASE_URL"] == "http://server:8000"
    probe = services["server"]["healthcheck"]["test"]
    assert probe[0] == "CMD" and probe[-1] == "/app/docker/healthcheck.py"
    assert any(p.endswith(":8000") for p in services["server"]["ports"])
    expose = dict(instructions(DOCKER / "Dockerfile.cpu"))["EXPOSE"]
    assert expose == "8000"


def test_health_path_is_a_server_route():
    import importlib.util

    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    from server.app import build_app

    assert probe.HEALTH_PATH in {route.path for route in build_app().routes}


def test_healthcheck_probe_exit_codes(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    healthy = {"value": True}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            ok = self.path == "/health" and healthy["value"]
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        monkeypatch.setenv("IRO_PORT", str(server.server_address[1]))
        assert probe.main() == 0
        healthy["value"] = False
        assert probe.main() == 1
    finally:
        server.shutdown()
        server.server_close()


# The CUDA each pinned CUDA build of vllm needs, read from the wheels' metadata on PyPI: vllm 0.32.0
# requires torch==2.13.0, whose manylinux wheel requires cuda-toolkit==13.0.3 (driver R580+).
# Bumping the gpu extra fails here until the image (and the README's driver floor) follow.
VLLM_CUDA = {"vllm==0.32.0": ("torch==2.13.0", "13.0", 580)}


def test_gpu_image_matches_the_cuda_of_the_pinned_wheels():
    (vllm,) = PYPROJECT["project"]["optional-dependencies"]["gpu"]
    assert vllm in VLLM_CUDA, f"{vllm}: look up its torch's CUDA and add it to VLLM_CUDA"
    torch, cuda, driver = VLLM_CUDA[vllm]
    assert torch in PYPROJECT["project"]["dependencies"]
    base = dict(instructions(DOCKER / "Dockerfile.gpu"))["FROM"]
    match = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-(base|runtime)-ubuntu\d+\.\d+", base)
    assert match and match.group(1) == cuda, base
    readme = (ROOT / "README.md").read_text()
    assert f"driver {driver}" in readme and f"CUDA {cuda}" in readme


def test_cpu_images_take_torch_from_the_makefile_not_their_own_index():
    # the Makefile adds the PyTorch CPU index to the CPU build's pip command (tests/test_makefile.py)
    for dockerfile in DOCKERFILES:
        assert "INDEX_URL" not in dockerfile.read_text(), dockerfile.name
    makefile = (ROOT / "Makefile").read_text()
    assert "--extra-index-url $(TORCH_INDEX)" in makefile


def test_compose_publishes_on_loopback_and_its_server_settings_start(monkeypatch):
    """The port is published on this host's loopback only, and the server's environment (with the
    Dockerfile's `--host 0.0.0.0`) passes the settings' open-admin check, which refuses keyless
    admin routes on a non-loopback address unless IRO_ALLOW_OPEN_ADMIN says so (issue 25)."""
    from server.settings import ServerSettings

    server = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["server"]
    assert server["ports"] and all(p.startswith("127.0.0.1:") for p in server["ports"])
    allow = re.fullmatch(r"\$\{IRO_ALLOW_OPEN_ADMIN:-(\w+)\}", server["environment"]["IRO_ALLOW_OPEN_ADMIN"]).group(1)
    for name in ("IRO_API_KEY", "IRO_ADMIN_KEY", "IRO_ALLOW_OPEN_ADMIN", "IRO_HOST"):
        monkeypatch.delenv(name, raising=False)
    cmd = exec_form(dict(instructions(DOCKER / "Dockerfile.cpu"))["CMD"])
    host = cmd[cmd.index("--host") + 1]
    assert ServerSettings(host=host, allow_open_admin=allow).admin_open_to_network()
    with pytest.raises(ValueError, match="allow-open-admin"):
        ServerSettings(host=host)
