"""A real Flower federation on loopback: one SuperLink and one SuperNode per site, as subprocesses.

The same commands a federation operator and site operators run (``fedvlp-server superlink -- --database``,
``fedvlp-server fleet-gateway``, ``fedvlp-site supernode --config SITE.yaml -- ...``: a SuperNode with
``--isolation process`` and the site's own runner; ``flwr run``), started and stopped for the local demo
and the end-to-end tests. Every process is started in its own session and killed with its children on
exit, also on Ctrl-C or failure. ``FLWR_HOME`` points into the work folder.

Secure by default, as the deploy kit is: a CA and a SuperLink certificate for TLS, one ECDSA key per
SuperNode registered with the SuperLink (``--enable-supernode-auth``), all made in ``WORKDIR/certs`` by
:mod:`server.tls`; the SuperLink's one port (Fleet, Control and Runtime APIs) serves the ``flwr``
commands, and the sites reach it through the Fleet gateway (:mod:`server.fleet_gateway`, the Fleet API
only). The SuperLink keeps its state in ``WORKDIR/superlink.db``, so a restarted SuperLink
(:meth:`LocalFederation.restart_superlink`) keeps the registered sites and the runs. ``secure=False``
runs plaintext without node authentication or gateway.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .tls import make_ca, make_node_key, make_server_cert

CONNECTION = "local-deployment"


# Sites run their SuperNode through `fedvlp-site supernode` (client/supernode.py): with --isolation process and
# the site runner, which vets each FAB and filters each reply; it also retries the refusal a SuperNode
# restarted right after a crash gets until the SuperLink marks its previous session offline
SUPERNODE = ["fedvlp-site", "supernode", "--rejoin-wait", "3"]


def app_snapshot(folder: str | Path, repo: str | Path | None = None) -> Path:
    """A copy of this app's files (pyproject.toml and the ``fab-include`` packages): it builds the same
    FAB as the checkout, in milliseconds instead of the ~8 s Flower's builder takes to walk a checkout
    with its virtual environment, and what ``flwr run`` sends stays what the sites approved whatever is
    edited in the checkout meanwhile."""
    import shutil

    repo, folder = Path(repo or Path(__file__).resolve().parents[1]), Path(folder)
    folder.mkdir(parents=True)
    shutil.copy(repo / "pyproject.toml", folder)
    for package in ("client", "server", "shared_models"):
        shutil.copytree(repo / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before opening port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"


def processes_using(addresses: list[str]) -> list[int]:
    """PIDs whose command line names one of ``addresses`` ("127.0.0.1:PORT"), from /proc.

    Flower's SuperLink and SuperNodes start ``flower-superexec`` in sessions of their own, and those
    start the ServerApp and ClientApps; after a crash these are re-parented to PID 1. What they share
    is the loopback address of their SuperLink or SuperNode, which we allocated.
    """
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        if any(address in arg for arg in text for address in addresses):
            pid = int(cmdline.parent.name)
            if pid != os.getpid():
                found.append(pid)
    return found


def _process_group(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    """Signal the process group a process leads (it was started in its own session)."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group is gone


class LocalFederation:
    """SuperLink + SuperNodes on 127.0.0.1.

    Args:
        workdir: folder for ``FLWR_HOME`` and logs.
        site_configs: one site YAML per SuperNode.
        extra_env: environment added to every process.
        secure: TLS and SuperNode authentication (default), else plaintext.
        heartbeat_s: the SuperNodes' heartbeat interval (``fedvlp-site supernode --heartbeat-interval``,
            10 to 1800 s; default Flower's 30 s): the SuperLink counts a site whose heartbeats stop out of
            its round, and lets the restarted site in, two intervals after its last heartbeat.
    """

    def __init__(self, workdir: str | Path, site_configs: list[str | Path], extra_env: dict[str, str] | None = None,
                 secure: bool = True, heartbeat_s: float | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.secure = secure
        self.heartbeat_s = heartbeat_s
        self.certs = self.workdir / "certs"
        self.site_configs = [str(Path(p).resolve()) for p in site_configs]
        self.logs = self.workdir / "logs"
        self.flwr_home = self.workdir / "flwr_home"
        self.port = 0
        self.fleet_port = 0  # the Fleet gateway's port (the SuperLink's own port when not secure)
        self.database = self.workdir / "superlink.db"
        self.superlink: subprocess.Popen | None = None
        self.gateway: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen | None] = [None] * len(self.site_configs)
        self.node_ports = [0] * len(self.site_configs)
        self.exporters: list[subprocess.Popen] = []
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "FLWR_HOME": str(self.flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "PYTHONUNBUFFERED": "1", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    **(extra_env or {})}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                                start_new_session=True)

    def start(self, via: dict[int, str] | None = None) -> "LocalFederation":
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        if self.secure:
            make_ca(self.certs)
            make_server_cert(self.certs, self.certs, ["127.0.0.1", "localhost"])
            trust = f'root-certificates = "{self.ca}"'
        else:
            trust = "insecure = true"
        self.start_superlink()
        self.address = f"127.0.0.1:{self.port}"
        (self.flwr_home / "config.toml").write_text(f'[superlink.{CONNECTION}]\naddress = "{self.address}"\n{trust}\n')
        self.fleet_port = self.port
        if self.secure:  # the sites' door: the Fleet API only (the Control API stays on the SuperLink's port)
            self.fleet_port = free_port()
            self.gateway = self._spawn("fleet_gateway", [
                "fedvlp-server", "fleet-gateway", "--listen", f"127.0.0.1:{self.fleet_port}",
                "--superlink", self.address, "--certs", str(self.certs)])
            wait_for_port(self.fleet_port, process=self.gateway)
        self.fleet_address = f"127.0.0.1:{self.fleet_port}"
        for i in range(len(self.site_configs)):
            if self.secure:
                self.register_key(self.node_key(i)[1])
            self.start_node(i, (via or {}).get(i))
        return self

    def start_superlink(self) -> None:
        """Start the SuperLink on ``self.port`` with its state in ``self.database`` (kept across restarts)."""
        if self.secure:
            security = ["--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(self.certs / "superlink.crt"),
                        "--ssl-keyfile", str(self.certs / "superlink.key"), "--enable-supernode-auth"]
        else:
            security = ["--insecure"]
        # Flower 1.41 serves its Runtime, Control and Fleet APIs on this one port
        # flower-superlink through server/superlink.py: its database holds the state, its objects stay in memory
        self.superlink = self._spawn("superlink", [
            "fedvlp-server", "superlink", "--", *security, "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.database), "--disable-runtime-dependency-installation",
        ])
        wait_for_port(self.port, process=self.superlink)

    def restart_superlink(self, sig: int = signal.SIGKILL) -> None:
        """Kill the SuperLink (SIGKILL: as if its machine died; its ServerApp dies with it) and start it again
        on the same port and database. The sites are left running: they reconnect by themselves."""
        keep = {p.pid for p in [*self.nodes, self.gateway, *self.exporters] if p is not None}
        _signal_group(self.superlink, sig)
        self.superlink.wait(timeout=30)
        deadline = time.time() + 10  # the killed SuperLink's SuperExec and ServerApp, in sessions of their own
        while (left := [pid for pid in processes_using([self.address]) if _process_group(pid) not in keep]) \
                and time.time() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        self.start_superlink()

    @property
    def ca(self) -> Path:
        return self.certs / "ca.crt"

    def node_key(self, i: int | str) -> tuple[Path, Path]:
        """Site ``i``'s key pair (private, public), made on first use."""
        name = f"supernode_{i}"
        if not (self.certs / f"{name}.key").is_file():
            make_node_key(self.certs, name)
        return self.certs / f"{name}.key", self.certs / f"{name}.pub"

    def register_key(self, public_key: Path) -> None:
        """``flwr supernode register``: the operator admits a SuperNode's public key."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / "register.log", "ab") as log:
            subprocess.run(["flwr", "supernode", "register", str(public_key), CONNECTION], stdout=log,
                           stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir, timeout=120, check=True)

    def supernode_args(self, i: int, key: Path | None = None) -> list[str]:
        """Security arguments of site ``i``'s SuperNode (``key`` overrides its registered key)."""
        if not self.secure:
            return ["--insecure"]
        return ["--root-certificates", str(self.ca), "--auth-supernode-private-key", str(key or self.node_key(i)[0])]

    def start_node(self, i: int, via: str | None = None) -> None:
        """Start (or restart) site ``i``: its SuperNode and site runner (``via``: another address that reaches
        the Fleet API)."""
        self.node_ports[i] = self.node_ports[i] or free_port()
        heartbeat = [] if self.heartbeat_s is None else ["--heartbeat-interval", str(self.heartbeat_s)]
        self.nodes[i] = self._spawn(f"supernode_{i}", [
            *SUPERNODE, *heartbeat, "--config", self.site_configs[i], "--", *self.supernode_args(i),
            "--superlink", via or self.fleet_address, "--port", str(self.node_ports[i]),
            "--node-config", f'site-config="{self.site_configs[i]}"',
        ])

    def start_site_exporter(self, i: int, port: int | None = None) -> int:
        """Start site ``i``'s metrics exporter (``fedvlp-site metrics``) on loopback; returns its port."""
        return self.start_site_exporters([i], [port])[0]

    def start_site_exporters(self, sites: list[int], ports: list[int | None] | None = None) -> list[int]:
        """Start the sites' exporters all at once, then wait for each to listen; returns their ports."""
        ports = [p or free_port() for p in (ports or [None] * len(sites))]
        started = []
        for i, port in zip(sites, ports):
            self.exporters.append(self._spawn(f"site_metrics_{i}", [
                sys.executable, "-m", "client.cli", "metrics", "--config", self.site_configs[i], "--port", str(port),
                "--address", "127.0.0.1"]))
            started.append(self.exporters[-1])
        for port, process in zip(ports, started):
            wait_for_port(port, process=process)
        return ports

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Stop site ``i``'s SuperNode and its ClientApp processes (SIGKILL: as if the machine died)."""
        process = self.nodes[i]
        if process is not None:
            _signal_group(process, sig)
            process.wait(timeout=30)
        self.nodes[i] = None

    def run(self, app_dir: str | Path, run_config: dict[str, Any], timeout: float = 1800,
            log_name: str = "run") -> subprocess.CompletedProcess:
        """``flwr run APP local-deployment --stream``; its output goes to ``logs/<log_name>.log``."""
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        args = ["flwr", "run", str(Path(app_dir).resolve()), CONNECTION, "--stream", "--run-config", overrides]
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{log_name}.log", "ab") as log:
            return subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                                  timeout=timeout, check=False)

    def run_async(self, app_dir: str | Path, run_config: dict[str, Any], log_name: str = "run") -> subprocess.Popen:
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        return self._spawn(log_name, ["flwr", "run", str(Path(app_dir).resolve()), CONNECTION, "--stream",
                                      "--run-config", overrides])

    def stop(self) -> None:
        """Stop every process group started here, also those whose leader already died (their children,
        e.g. the ServerApp of a killed SuperLink, are in the same group)."""
        started = [p for p in [*self.nodes, self.gateway, self.superlink, *self.exporters] if p is not None]
        for process in started:
            _signal_group(process, signal.SIGTERM)
        deadline = time.time() + 15
        for process in started:
            try:
                process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)  # whatever of the group is left
            process.wait(timeout=10)
        deadline = time.time() + 10  # the SuperExecs' apps, in sessions of their own; gone when stop returns
        while (left := processes_using(self.addresses())) and time.time() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        self.nodes = [None] * len(self.site_configs)
        self.superlink = self.gateway = None
        self.exporters = []

    def addresses(self) -> list[str]:
        """The loopback addresses of this federation's SuperLink and SuperNodes."""
        return [f"127.0.0.1:{port}" for port in {self.port, self.fleet_port, *self.node_ports} if port]

    def __enter__(self) -> "LocalFederation":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
