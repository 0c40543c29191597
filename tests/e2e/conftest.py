"""What the end-to-end tests share: the synthetic cohort, one snapshot of this app, one uninterrupted reference
run (watched by both exporters and through recording TLS relays), and the helpers the test modules load from
here by path (tests are not a package).

Most of an end-to-end round's time is Flower's machinery, not training: every array of the model is two
objects (the array and its chunk), each one HTTP request per hop (SuperLink -> SuperNode -> site runner ->
app and back, then to the ServerApp), and each ClientApp process imports torch and transformers afresh. So
the model here is the tiny preset cut to one block per tower and narrow (124 arrays, 6 MB, against the
preset's 172 and 23 MB), the sites have 4 studies each, and runs are started from a copy of the app's files
(``flwr run`` on the checkout walks the whole tree, .venv included, to build the FAB: about 8 s; the copy
builds the very same FAB in milliseconds).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from server.checkpoint import RunFolder
from server import local_federation
from server.local_federation import LocalFederation, free_port
from server.tls import make_server_cert

REPO = Path(__file__).resolve().parents[2]
# the tiny preset, one block per tower and narrow, on 32^3 volumes: the tests are about the deployment
MODEL = {"preset": "tiny",
         "preprocess": {"size": [32, 32, 32]},
         "vision": {"width": 64, "depth": 1, "heads": 2},
         "text": {"random_init": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "intermediate_size": 64}, "max_length": 64},
         "decoder": {"width": 32, "layers": 1, "heads": 2, "max_length": 64},
         "mae": {"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2},
         "embed_dim": 32, "pool_heads": 2}
REFERENCE_SEED = 7  # the reference run's seed; a run with this seed and the reference's settings must end alike


def load_helpers(name: str = "_e2e_helpers"):
    """This file as a module (for the test modules: tests/e2e is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_config(run_dir: Path, rounds: int, **extra) -> dict:
    return {"recipe": "tiny", "run-dir": str(run_dir), "num-rounds": rounds, "local-steps": 1,
            "min-replies": 2, "min-available": 2, "max-update-norm": 1e6, **extra}


def preset_override(cohort, run_dir: Path) -> Path:
    """A recipe file naming the cohort's model YAML as preset (run configs carry scalars only)."""
    recipe = yaml.safe_load((REPO / "server" / "recipes" / "tiny.yaml").read_text())
    recipe.update(preset=cohort["model"], round_timeout_s=120)
    path = run_dir.parent / f"{run_dir.name}_recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def app_snapshot(folder: Path) -> Path:
    """A copy of this app's files (see :func:`server.local_federation.app_snapshot`)."""
    return local_federation.app_snapshot(folder, REPO)


def final_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    latest = RunFolder(run_dir).latest()
    assert latest is not None, f"no checkpoint in {run_dir}"
    return latest.arrays


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def scrape(port: int) -> dict[tuple[str, tuple], float] | None:
    """``{(sample name, sorted labels): value}`` from a Prometheus exporter, or None if it does not answer."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples} | {("_text", ()): text}


class RecordingTlsProxy:
    """A TLS relay from a SuperNode to the Fleet gateway that keeps every byte the SuperNode sends, decrypted:
    the SuperNode's side of its connection. It shows a certificate of the federation's CA (made with the CA
    key in ``certs``), so the SuperNode's check of the certificate passes as it does for the gateway."""

    def __init__(self, certs: Path, name: str, target: int) -> None:
        cert, key = make_server_cert(certs, certs, ["127.0.0.1"], name=f"relay-{name}")
        self.server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_tls.load_cert_chain(cert, key)
        self.client_tls = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        self.port, self.target, self.sent = free_port(), target, bytearray()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = asyncio.run_coroutine_threadsafe(asyncio.start_server(
            self._relay, "127.0.0.1", self.port, ssl=self.server_tls), self.loop).result(timeout=30)

    async def _relay(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target, ssl=self.client_tls,
                                                                 server_hostname="127.0.0.1")
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False))

    async def _pipe(self, reader, writer, record: bool) -> None:
        try:
            while data := await reader.read(65536):
                if record:
                    self.sent += data
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


def recorded_federation(workdir: Path, sites: list[Path], **options) -> tuple[LocalFederation, dict[int, RecordingTlsProxy]]:
    """A secure federation whose every site connects through a :class:`RecordingTlsProxy`."""
    fed, proxies = LocalFederation(workdir, sites, **options), {}
    original_start = fed.start_node

    def start_node(i, via=None):
        proxies[i] = proxies.get(i) or RecordingTlsProxy(fed.certs, str(i), fed.fleet_port)
        original_start(i, f"127.0.0.1:{proxies[i].port}")

    fed.start_node = start_node
    return fed, proxies


def site_yaml_with(cohort_site: Path, out: Path, privacy: dict) -> Path:
    """A copy of a cohort site's YAML (absolute paths) with another ``privacy`` section."""
    raw = yaml.safe_load(cohort_site.read_text())
    folder = cohort_site.parent
    raw["cache_dir"] = str(folder / raw["cache_dir"])
    for key in ("dicom_root", "nifti_manifest"):
        raw["data"][key] = str(folder / raw["data"][key])
    raw["data"]["reports"]["path"] = str(folder / raw["data"]["reports"]["path"])
    raw["privacy"] = privacy
    out.write_text(yaml.safe_dump(raw))
    return out


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """Three small ingested synthetic sites and a model YAML for them."""
    from client.cli import main as site_cli

    root = tmp_path_factory.mktemp("cohort")
    model_yaml = root / "model.yaml"
    model_yaml.write_text(yaml.safe_dump(MODEL))
    sites = []
    for i, profile in enumerate(["general", "cardio", "pulmonary"]):
        folder = root / f"site{i}"
        assert site_cli(["synth", "--out", str(folder), "--profile", profile, "--studies", "4", "--seed", str(i)]) == 0
        config = {"site_id": f"site{i}", "model": str(model_yaml), "cache_dir": "cache",
                  "data": {"dicom_root": "dicom", "nifti_manifest": "nifti_manifest.csv", "reports": {"path": "reports.csv"}},
                  "compute": {"batch_size": 2, "workers": 0, "threads": 1},
                  # these tests are not about which app versions run (tests/e2e/test_security.py is): any
                  "privacy": {"allowed_fab_hashes": "any"}}
        (folder / "site.yaml").write_text(yaml.safe_dump(config))
        assert site_cli(["ingest", "--config", str(folder / "site.yaml"), "--quiet", "--workers", "0"]) == 0
        sites.append(folder / "site.yaml")
    return {"sites": sites, "model": str(model_yaml), "root": root}


@pytest.fixture(scope="session")
def app(tmp_path_factory) -> Path:
    """This app's files, copied once: every run of the session sends the same FAB."""
    return app_snapshot(tmp_path_factory.mktemp("app") / "fedvlp")


@pytest.fixture(scope="session")
def reference_run(cohort, app, tmp_path_factory):
    """One uninterrupted 2-round run of this app on the first two sites (seed :data:`REFERENCE_SEED`),
    watched every way the tests check it: each site reaches the Fleet gateway through a
    :class:`RecordingTlsProxy` (every byte it sends, decrypted) and keeps an egress log; the ServerApp's
    exporter is scraped while the run goes on, each site's exporter before the run and after it.

    Used by test_deployment.py (exporters; the result a resumed run must reach) and test_security.py
    (what leaves the sites)."""
    root = tmp_path_factory.mktemp("reference")
    sites = [site_yaml_with(cohort["sites"][i], root / f"site{i}.yaml",
                            {"allowed_fab_hashes": "any", "egress_log": str(root / f"egress{i}.jsonl")})
             for i in range(2)]
    run_dir = root / "run"
    server_port = free_port()
    config = run_config(run_dir, 2, recipe=str(preset_override(cohort, run_dir)), seed=REFERENCE_SEED,
                        **{"metrics-port": server_port, "metrics-address": "127.0.0.1"})
    server_seen = None
    fed, proxies = recorded_federation(root / "fed", sites)
    try:
        with fed:
            site_ports = [fed.start_site_exporter(i) for i in range(2)]
            sites_before = [scrape(port) for port in site_ports]  # the cache's counters live across runs
            run = fed.run_async(app, config)
            deadline = time.time() + 900
            while run.poll() is None:  # the ServerApp's exporter lives as long as the run: scrape it meanwhile
                assert time.time() < deadline, "the reference run did not finish"
                sample = scrape(server_port)
                if sample and sample.get(("fedvlp_server_round", ()), 0) >= 1:
                    server_seen = sample
                time.sleep(0.3)
            sites_after = [scrape(port) for port in site_ports]
    finally:
        for proxy in proxies.values():
            proxy.close()
    return SimpleNamespace(fed=fed, run=run, run_dir=run_dir, config=config, sites=sites, root=root,
                           egress=[root / f"egress{i}.jsonl" for i in range(2)],
                           wire={i: bytes(proxy.sent) for i, proxy in proxies.items()},
                           server_seen=server_seen, sites_before=sites_before, sites_after=sites_after)
