"""Transport security and egress on a real deployment: TLS, SuperNode authentication, the Fleet gateway,
the site runner's app policy against a hostile app, and every byte each site sends checked for identifiers.

The federation is the same as tests/e2e/test_deployment.py (the ``cohort`` and ``reference_run`` fixtures
of tests/e2e/conftest.py are shared). What a site sends is read on the SuperNode's side of its TLS
connection: a relay with a certificate of the federation's CA sits between the SuperNode and the Fleet
gateway and keeps the decrypted bytes.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import time
from pathlib import Path

import httpx

from client.cli import main as site_cli
from client.ingest.cache import read_manifest
from client.site_config import load_site_config
from server.local_federation import LocalFederation, free_port, processes_using


def _helpers():
    """tests/e2e/conftest.py's helpers (tests are not a package: loaded by path)."""
    spec = importlib.util.spec_from_file_location("_e2e_helpers", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_e2e = _helpers()
REPO, preset_override, run_config = _e2e.REPO, _e2e.preset_override, _e2e.run_config
app_snapshot, recorded_federation, site_yaml_with = _e2e.app_snapshot, _e2e.recorded_federation, _e2e.site_yaml_with


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
    return fed._spawn(name, ["flower-supernode", *args, "--superlink", fed.fleet_address, "--port", str(free_port()),
                             "--max-retries", "3", "--max-wait-time", "20",
                             "--node-config", f'site-config="{site_yaml}"'])


def test_tls_node_auth_and_the_gateway_admit_registered_sites_to_the_fleet_api_only(cohort, tmp_path):
    with LocalFederation(tmp_path / "fed", cohort["sites"][:1]) as fed:
        assert fed.secure and "--enable-supernode-auth" in (fed.superlink.args)
        assert "--database" in fed.superlink.args and fed.fleet_port != fed.port
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
        # the sites' port serves the Fleet API only: no run can be listed or submitted through it
        for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/acquire-task"):
            answer = httpx.post(f"https://127.0.0.1:{fed.fleet_port}{path}", content=b"", verify=str(fed.ca), timeout=30)
            assert answer.status_code == 404, (path, answer.status_code)
        home = fed.flwr_home / "config.toml"
        home.write_text(home.read_text() + f'[superlink.gateway]\naddress = "{fed.fleet_address}"\n'
                                           f'root-certificates = "{fed.ca}"\n')
        refused = subprocess.run(["flwr", "ls", "gateway"], env=fed.env, cwd=fed.workdir, capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode != 0
        assert "refused POST /v1/control/" in node_log(fed, "fleet_gateway")
        # and a plain-HTTP request to either TLS port gets no answer
        for port in (fed.port, fed.fleet_port):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                s.settimeout(10)
                try:
                    answer = s.recv(100)
                except (socket.timeout, ConnectionResetError):
                    answer = b""
            assert not answer.startswith(b"HTTP/1.1 2")
    assert processes_using(fed.addresses()) == []


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


def test_no_identifier_leaves_any_site(reference_run):
    """Every byte each site sends over a 2-round run with TLS on (registration, heartbeats, pulls, replies) is
    read on the SuperNode's side of its TLS connection and searched for every site's identifiers; each
    site's egress log shows the replies that left. The run is ``reference_run`` (tests/e2e/conftest.py)."""
    ref = reference_run
    assert ref.run.returncode == 0, (ref.fed.logs / "run.log").read_text()[-3000:]
    secrets = [identifiers(site) for site in ref.sites]
    assert sorted(ref.wire) == [0, 1]
    for i, wire in ref.wire.items():
        assert b"num-examples" in wire and b"train-loss" in wire  # the recording holds the replies, decrypted
        assert len(wire) > 2 * 1_000_000  # two rounds of weights went through
        leaks = {(j, kind): sorted(v for v in values if v.encode() in wire)
                 for j, found in enumerate(secrets) for kind, values in found.items()}
        assert all(not found for found in leaks.values()), (i, leaks)
        egress = [json.loads(line) for line in ref.egress[i].read_text().splitlines()]
        assert len(egress) == 2 and all(e["site_runner"] and e["metrics"]["num-examples"] > 0 for e in egress)
        assert all(e["fab_hash"] == egress[0]["fab_hash"] and not e.get("dropped") for e in egress)
    history = [json.loads(line) for line in (ref.run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["participation"]["valid"] for h in history] == [2, 2]


def test_a_hostile_app_never_runs_where_pinned_and_sends_only_the_filtered_reply_where_any_app_runs(
        cohort, tmp_path, hostile_app_writer):
    """Site 0 approved this app (``fedvlp-site approve``); site 1 runs any app. A hostile FAB (no mods; it
    replies with a report sentence in a metric, an extra array and a config record) is refused at site 0
    before any of it is imported, and at site 1 its reply leaves filtered. Then this app runs at both."""
    honest = app_snapshot(tmp_path / "honest")
    hostile = hostile_app_writer(tmp_path / "hostile", tmp_path / "markers", repo=REPO)
    pinned = site_yaml_with(cohort["sites"][0], tmp_path / "pinned.yaml",
                            {"egress_log": str(tmp_path / "egress0.jsonl")})
    open_site = site_yaml_with(cohort["sites"][1], tmp_path / "open.yaml",
                               {"allowed_fab_hashes": "any", "egress_log": str(tmp_path / "egress1.jsonl")})
    assert site_cli(["approve", str(honest), "--config", str(pinned), "--yes"]) == 0
    caches = [Path(load_site_config(site).cache_dir) for site in (pinned, open_site)]
    hostile_hash = _hash_of(hostile)
    fed, proxies = recorded_federation(tmp_path / "fed", [pinned, open_site])
    try:
        with fed:
            runs = {}
            for name, app in (("hostile", hostile), ("honest", honest)):
                runs[name] = tmp_path / f"run_{name}"
                result = fed.run(app, run_config(runs[name], 1, recipe=str(preset_override(cohort, runs[name])),
                                                 **{"min-replies": 1}), timeout=900, log_name=f"run_{name}")
                assert result.returncode == 0, (fed.logs / f"run_{name}.log").read_text()[-3000:]
    finally:
        for proxy in proxies.values():
            proxy.close()
    (hostile_round,) = [json.loads(x) for x in (runs["hostile"] / "history.jsonl").read_text().splitlines()]
    assert hostile_round["participation"]["valid"] == 1  # site 1's filtered reply
    (error,) = hostile_round["participation"]["errors"]
    assert f"refuses to run FAB {hostile_hash}" in error["reason"]
    imported = [marker.read_text() for marker in (tmp_path / "markers").glob("imported-*")]
    assert imported and all(str(caches[1]) in where for where in imported)  # imported at site 1 only
    site0 = node_log(fed, "supernode_0")
    assert f"refuses to run FAB {hostile_hash}" in site0 and f"FAB {hostile_hash} is allowed" not in site0
    sentence = next((tmp_path / "markers").glob("ran-*")).read_text()
    assert len(sentence) > 25 and sentence.encode() in (caches[1] / "manifest.jsonl").read_bytes()
    for proxy in proxies.values():
        wire = bytes(proxy.sent)
        assert b"num-examples" in wire and sentence.encode() not in wire and b"exfiltrated" not in wire
    (refusal,) = [json.loads(x) for x in (tmp_path / "egress0.jsonl").read_text().splitlines()
                  if json.loads(x)["fab_hash"] == hostile_hash]
    assert "refuses" in refusal["error"]["reason"]
    (filtered,) = [json.loads(x) for x in (tmp_path / "egress1.jsonl").read_text().splitlines()
                   if json.loads(x)["fab_hash"] == hostile_hash]
    assert filtered["metrics"] == {"num-examples": 1}
    assert {"array arrays.exfiltrated-report-bytes", "config record 'exfiltrated-config'",
            "array record 'exfiltrated-arrays'", "metric metrics.train-loss (list)"} <= set(filtered["dropped"])
    (honest_round,) = [json.loads(x) for x in (runs["honest"] / "history.jsonl").read_text().splitlines()]
    assert honest_round["participation"]["valid"] == 2  # the approved version runs at the pinned site


def _hash_of(app: Path) -> str:
    from client.fab_pinning import fab_hash_of_project

    return fab_hash_of_project(app)
