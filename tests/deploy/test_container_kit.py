"""deploy/: the Dockerfile and the compose files, checked as far as possible without a Docker engine."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
IMAGE_DEPLOY = "/opt/fedvlp/deploy/"


def compose(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "compose" / f"{name}.yml").read_text())


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) of a service's short-syntax volumes."""
    out = {}
    for volume in service.get("volumes", []):
        # a source may be "${VAR:?message}/file": split off the target and mode from the right
        parts = volume.rsplit(":", 2) if volume.endswith((":ro", ":rw")) else volume.rsplit(":", 1) + ["rw"]
        source, target, mode = parts
        out[target] = (source, mode)
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def image_files() -> dict[str, str]:
    """Path in the image -> path in the repository, for the Dockerfile's COPY lines into /opt/fedvlp/deploy/."""
    files = {}
    for op, args in dockerfile_instructions():
        if op == "COPY" and args.split()[-1] == IMAGE_DEPLOY:
            files.update({IMAGE_DEPLOY + Path(src).name: src for src in args.split()[:-1]})
    return files


def test_every_yaml_of_the_kit_parses():
    found = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    assert len(found) >= 6
    for path in found:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_the_dockerfile_installs_pinned_torch_before_the_project():
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [args for op, args in steps if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install (-c constraints\.txt )?\.(\s|$)", r))
    assert torch_at < project_at
    assert "-c constraints.txt" in runs[torch_at] and "-c constraints.txt" in runs[project_at]
    assert "-e " not in runs[project_at] and "--upgrade-strategy eager" not in " ".join(runs)
    assert "--no-deps -r requirements-nodeps.txt" in " ".join(runs[project_at:])
    copies = [args for op, args in steps if op == "COPY"]
    assert "constraints.txt" in copies[0]  # what the torch step needs, copied before it
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text().split()
    env = " ".join(args for op, args in steps if op == "ENV")
    for setting in ("FLWR_TELEMETRY_ENABLED=0", "FLWR_DISABLE_UPDATE_CHECK=1", "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"):
        assert setting in env
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_the_build_context_leaves_out_the_venv_runs_and_keys():
    lines = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # an allow-list: everything not named below stays out
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    copied = [src for op, args in dockerfile_instructions() if op == "COPY" for src in args.split()[:-1]]
    for src in copied:
        assert src in allowed, f"COPY {src} is not in the build context"
        assert (REPO / src).exists(), src
    assert not any(a in (".venv", "runs", "certs", "keys") or a.endswith((".key", ".env")) for a in allowed)


@pytest.mark.parametrize("name,services", [("server", {"superlink", "prometheus", "grafana"}),
                                           ("site", {"supernode", "site-exporter", "approve", "prometheus"})])
def test_compose_files_have_their_services_and_images_build_from_the_dockerfile(name, services):
    spec = compose(name)
    assert set(spec["services"]) == services and spec["name"]
    for service in spec["services"].values():
        assert "image" in service
        if "build" in service:
            assert (DEPLOY / "compose" / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    for volume in {s.split(":")[0] for svc in spec["services"].values() for s in svc.get("volumes", [])}:
        if not volume.startswith(("$", ".", "/")):
            assert volume in spec["volumes"], f"named volume {volume} is not declared"


def test_every_compose_variable_is_in_the_env_example():
    for name in ("server", "site"):
        text = (DEPLOY / "compose" / f"{name}.yml").read_text()
        used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
        example = (DEPLOY / "compose" / f"{name}.env.example").read_text()
        defined = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.M))
        assert used and used == defined, (name, used ^ defined)


def script_usage(script: str) -> list[str]:
    return re.search(r"usage: \S+ (.*?)}", (DEPLOY / script).read_text()).group(1).split()


def test_the_superlink_service_runs_the_start_script_with_read_only_certificates_and_no_ca_key():
    superlink = compose("server")["services"]["superlink"]
    command = superlink["command"]
    assert image_files()[command[0]] == "deploy/start_superlink.sh"
    assert len(command) - 1 <= len(script_usage("start_superlink.sh"))
    certs, port = command[1], int(command[2])
    volumes = mounts(superlink)
    for name in ("ca.crt", "superlink.crt", "superlink.key"):  # what start_superlink.sh reads from CERT_DIR
        assert f'"$certs/{name}"' in (DEPLOY / "start_superlink.sh").read_text()
        assert volumes[f"{certs}/{name}"][1] == "ro"
    assert not any("ca.key" in source or "ca.key" in target for target, (source, _) in volumes.items())
    assert any(str(p).split(":")[-1] == str(port) and str(p).count(":") == 1 for p in superlink["ports"])
    assert volumes["/srv/fedvlp/runs"] == ("runs", "rw")  # run folders survive the container


def test_the_supernode_service_mounts_data_and_keys_read_only_and_reserves_gpus():
    spec = compose("site")
    supernode, exporter = spec["services"]["supernode"], spec["services"]["site-exporter"]
    command = supernode["command"]
    assert image_files()[command[0]] == "deploy/start_supernode.sh"
    assert len(script_usage("start_supernode.sh")) - 1 == len(command) - 1  # all but the optional PORT
    ca, key, site_yaml = command[2:5]
    volumes = mounts(supernode)
    for path in (ca, key, site_yaml, "/mnt/pacs-export", "/mnt/ris-export"):
        assert volumes[path][1] == "ro", path
    assert volumes["/var/lib/fedvlp/cache"] == ("cache", "rw")
    assert not supernode.get("ports")  # a SuperNode only connects out
    (device,) = supernode["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # the exporter shares the cache, read-only, and reads the same site YAML
    exporter_volumes = mounts(exporter)
    assert exporter_volumes["/var/lib/fedvlp/cache"] == ("cache", "ro")
    assert all(mode == "ro" for _, mode in exporter_volumes.values())
    assert "/mnt/pacs-export" not in exporter_volumes and "/mnt/ris-export" not in exporter_volumes  # not needed
    assert exporter["command"][:3] == ["fedvlp-site", "metrics", "--config"]
    assert exporter_volumes[exporter["command"][3]][1] == "ro"


def test_the_example_site_yaml_uses_the_container_paths_of_the_site_compose_file():
    volumes = mounts(compose("site")["services"]["supernode"])
    example = yaml.safe_load((REPO / "site_configs" / "example-site.yaml").read_text())
    assert example["cache_dir"] in volumes
    assert example["data"]["dicom_root"] in volumes
    assert str(Path(example["data"]["reports"]["path"]).parent) in volumes


def test_the_commands_the_containers_run_exist():
    for path, src in image_files().items():
        assert (REPO / src).is_file(), src
        if path.endswith(".sh"):
            assert subprocess.run(["bash", "-n", str(REPO / src)]).returncode == 0
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'fedvlp-site = "client.cli:main"' in pyproject
    from client.cli import main

    with pytest.raises(SystemExit) as exit_:  # `fedvlp-site metrics --config SITE.yaml` (site-exporter)
        main(["metrics", "--help"])
    assert exit_.value.code == 0


def test_the_operator_guide_uses_only_commands_that_exist():
    guide = (DEPLOY / "OPERATORS.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", guide, re.S)).replace("\\\n", " ")
    commands = [shlex.split(line.split("#")[0]) for line in blocks.splitlines() if line.split("#")[0].strip()]
    assert len(commands) >= 15
    from client.cli import main as site_main
    from server.cli import main as server_main

    flwr = Path(sys.executable).with_name("flwr")
    helps: dict[tuple, subprocess.CompletedProcess] = {}
    checked = set()
    for words in commands:
        if words[0] in ("cp", "docker"):
            if words[0] == "docker":
                files = [words[i + 1] for i, w in enumerate(words) if w in ("-f", "--env-file") and "/" in words[i + 1]]
                assert files, words
                assert all((REPO / f).exists() or (REPO / (f + ".example")).exists() for f in files), words
            continue
        if words[0].endswith("python"):
            words = words[1:]
        if words[0].startswith("deploy/"):
            assert (REPO / words[0]).is_file(), words
        elif words[0] in ("fedvlp-site", "fedvlp-server"):
            main = site_main if words[0] == "fedvlp-site" else server_main
            with pytest.raises(SystemExit) as exit_:
                main([words[1], "--help"])
            assert exit_.value.code == 0, words
        elif words[0] == "flwr":
            sub = [w for w in words[1:3] if not w.startswith("-") and w != "."][:2 if words[1] == "supernode" else 1]
            if tuple(sub) not in helps:
                helps[tuple(sub)] = subprocess.run([str(flwr), *sub, "--help"], capture_output=True, text=True,
                                                   timeout=120)
            out = helps[tuple(sub)]
            assert out.returncode == 0, words
            for flag in (w.split("=")[0] for w in words if w.startswith("--")):
                assert flag in out.stdout, (words, flag)
        else:
            raise AssertionError(f"unchecked command in OPERATORS.md: {words}")
        checked.add(words[0])
    assert {"flwr", "fedvlp-site", "fedvlp-server", "deploy/start_superlink.sh", "deploy/make_certs.py"} <= checked
