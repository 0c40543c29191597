"""Transport security and egress on a real deployment: TLS, SuperNode authentication, and every byte a
site sends checked for identifiers.

The federation is the same as tests/e2e/test_deployment.py (its ``cohort`` fixture is reused).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from client.ingest.cache import read_manifest
from client.site_config import load_site_config
from server.local_federation import LocalFederation, free_port, processes_using


def _deployment_module():
    """tests/e2e/test_deployment.py (tests are not a package: loaded by path) for its fixture and helpers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_e2e_deployment", Path(__file__).with_name("test_deployment.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_deployment = _deployment_module()
REPO, preset_override, run_config = _deployment.REPO, _deployment.preset_override, _deployment.run_config
cohort = _deployment.cohort  # the module-scoped fixture: three small ingested synthetic sites


def node_log(fed: LocalFederation, name: str) -> str:
    path = fed.logs / f"{name}.log"
    return path.read_text(errors="replace") if path.is_file() else ""


def connected_nodes(fed: LocalFederation) -> list[dict]:
    out = subprocess.run(["flwr", "supernode", "ls", "local-deployment", "--format", "json"], env=fed.env,
                         cwd=fed.workdir, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return [n for n in json.loads(out.stdout)["nodes"] if n.get("status") == "online"]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def extra_supernode(fed: LocalFederation, site_yaml: Path, name: str, args: list[str]) -> subprocess.Popen:
    return fed._spawn(name, ["flower-supernode", *args, "--superlink", fed.address, "--port", str(free_port()),
                             "--max-retries", "3", "--max-wait-time", "20",
                             "--node-config", f'site-config="{site_yaml}"'])


def test_tls_and_node_auth_admit_registered_sites_only(cohort, tmp_path):
    with LocalFederation(tmp_path / "fed", cohort["sites"][:1]) as fed:
        assert fed.secure and "--enable-supernode-auth" in (fed.superlink.args)
        wait_until(lambda: len(connected_nodes(fed)) == 1, 90, "the registered SuperNode to connect")

        unregistered_key = fed.node_key("intruder")[0]  # a valid key pair the operator never registered
        intruder = extra_supernode(fed, cohort["sites"][1], "intruder", fed.supernode_args(1, key=unregistered_key))
        plaintext = extra_supernode(fed, cohort["sites"][2], "plaintext", ["--insecure"])
        for process in (intruder, plaintext):
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
        assert len(connected_nodes(fed)) == 1  # neither got in
        intruder_log, plaintext_log = node_log(fed, "intruder"), node_log(fed, "plaintext")
        assert intruder.poll() not in (None, 0), intruder_log[-2000:]
        assert "Failed to activate SuperNode" in intruder_log  # refused by node authentication
        assert plaintext.poll() not in (None, 0), plaintext_log[-2000:]
        assert "Failed to activate SuperNode" not in plaintext_log  # it never got as far as asking
        for process in (intruder, plaintext):
            if process.poll() is None:
                process.kill()
        # and a plain-HTTP request to the TLS port gets no answer
        with socket.create_connection(("127.0.0.1", fed.port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(10)
            try:
                answer = s.recv(100)
            except (socket.timeout, ConnectionResetError):
                answer = b""
        assert not answer.startswith(b"HTTP/1.1 2")
    assert processes_using(fed.addresses()) == []


class RecordingProxy:
    """A TCP relay from a SuperNode to the SuperLink that keeps every byte the SuperNode sends."""

    def __init__(self) -> None:
        self.port = free_port()
        self.target: int | None = None
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._server.close()


def identifiers(site_yaml: Path) -> dict[str, set[str]]:
    """What must never leave the site: paths, UIDs, patient and accession identifiers, report text."""
    cfg = load_site_config(site_yaml)
    found: dict[str, set[str]] = {"path": {str(site_yaml), cfg.cache_dir, str(cfg.data.dicom_root)},
                                  "uid": set(), "patient": set(), "accession": set(), "report": set(),
                                  "site_id": {cfg.site_id}}
    for row in read_manifest(cfg.cache_dir):
        found["uid"] |= {row["study_uid"], row["series_uid"], row["series_key"]}
        found["patient"].add(row["patient_id"])
        found["accession"].add(row["accession_number"])
        found["path"].add(row["cache_file"])
        if row.get("report"):
            sentences = [s.strip() for s in row["report"].replace("\n", " ").split(".") if len(s.strip()) > 25]
            found["report"] |= set(sentences[:3])
    index = json.loads((Path(cfg.cache_dir) / "file_index.json").read_text())["files"]
    found["path"] |= set(list(index)[:50])  # the DICOM files' paths
    return {k: {v for v in values if v and len(v) >= 6} for k, values in found.items()}


def test_no_identifier_leaves_a_site(cohort, tmp_path):
    """Every byte site 0 sends over a 2-round run (registration, heartbeats, pulls, replies) is recorded
    on the wire and searched for the site's identifiers; the replies also pass the egress log."""
    site_yaml = cohort["sites"][0]
    audit_yaml = tmp_path / "site0.yaml"
    config = load_site_config(site_yaml)
    raw = json.loads(json.dumps({"site_id": config.site_id, "model": config.model, "cache_dir": config.cache_dir,
                                 "data": {"dicom_root": config.data.dicom_root,
                                          "nifti_manifest": config.data.nifti_manifest,
                                          "reports": {"path": config.data.reports.path}},
                                 "compute": {"batch_size": 2, "workers": 0, "threads": 1},
                                 "privacy": {"egress_log": str(tmp_path / "egress.jsonl")}}))
    import yaml

    audit_yaml.write_text(yaml.safe_dump(raw))
    proxy = RecordingProxy()
    run_dir = tmp_path / "run"
    fed = LocalFederation(tmp_path / "fed", [audit_yaml, cohort["sites"][1]], secure=False)
    try:
        original_start = fed.start_node

        def start_node(i, via=None):
            if i == 0:
                proxy.target = fed.port
                via = f"127.0.0.1:{proxy.port}"
            original_start(i, via)

        fed.start_node = start_node
        with fed:
            result = fed.run(REPO, run_config(cohort, run_dir, 2, recipe=str(preset_override(cohort, run_dir))),
                             timeout=600)
            assert result.returncode == 0, (fed.logs / "run.log").read_text()[-3000:]
    finally:
        proxy.close()
    wire = bytes(proxy.sent)
    assert b"num-examples" in wire and b"train-loss" in wire  # the recording holds the replies, uncompressed
    assert len(wire) > 2 * 1_000_000  # two rounds of weights went through
    leaks = {kind: sorted(v for v in values if v.encode() in wire) for kind, values in identifiers(audit_yaml).items()}
    assert all(not found for found in leaks.values()), leaks
    egress = [json.loads(line) for line in (tmp_path / "egress.jsonl").read_text().splitlines()]
    assert len(egress) == 2 and all("arrays" in e and e["metrics"]["num-examples"] > 0 for e in egress)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["participation"]["valid"] for h in history] == [2, 2]


def test_a_site_pinned_to_other_app_versions_refuses_this_one(cohort, tmp_path):
    """Site 0 allows the FAB ``flwr run`` sends (its hash computed as a site operator would); site 1
    allows only another version and refuses, with an error the server records."""
    import yaml

    from client.fab_pinning import fab_hash_of_project

    this_app = fab_hash_of_project(REPO)
    pinned = []
    for i, allowed in enumerate([[this_app], ["0" * 64]]):
        raw = yaml.safe_load(Path(cohort["sites"][i]).read_text())
        raw["privacy"] = {"allowed_fab_hashes": allowed}
        raw["cache_dir"] = str(Path(cohort["sites"][i]).parent / raw["cache_dir"])
        for key in ("dicom_root", "nifti_manifest"):
            raw["data"][key] = str(Path(cohort["sites"][i]).parent / raw["data"][key])
        raw["data"]["reports"]["path"] = str(Path(cohort["sites"][i]).parent / raw["data"]["reports"]["path"])
        path = tmp_path / f"pinned{i}.yaml"
        path.write_text(yaml.safe_dump(raw))
        pinned.append(path)
    run_dir = tmp_path / "run"
    with LocalFederation(tmp_path / "fed", pinned) as fed:
        result = fed.run(REPO, run_config(cohort, run_dir, 1, recipe=str(preset_override(cohort, run_dir)),
                                          **{"min-replies": 1}), timeout=600)
        assert result.returncode == 0, (fed.logs / "run.log").read_text()[-3000:]
    (record,) = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    participation = record["participation"]
    assert participation["valid"] == 1 and not record["skipped"]
    (error,) = participation["errors"]
    assert f"refuses to run FAB {this_app}" in error["reason"] and "allowed_fab_hashes" in error["reason"]
