"""The app process the site runner starts for one message: install the FAB, load its ClientApp, call it.

    python -m client.app_process TASK_DIR        # started by client.site_runner, not by hand

By the time this process starts, the site runner has checked the FAB's hash against the site's
allowlist. This process holds no token of the SuperNode's Runtime API and never talks to it: it reads
the FAB, the message and the context from ``TASK_DIR`` (written by the runner) and writes the app's reply
and context back there; the runner filters the reply before anything leaves the site. Running the app
here rather than in the runner keeps the FAB's code out of the runner's memory.

``TASK_DIR`` holds ``app.fab``, ``message.pb`` and ``context.pb`` (Flower's protobuf ``Message`` and
``Context``) and ``task.json`` (task, run and node ids, FAB id and version); the process adds
``reply.pb`` and ``context_out.pb`` and exits 0, or exits non-zero with the traceback on stderr (the
runner's log). The FAB is installed into ``$FLWR_HOME/apps`` (a folder of this task).

A FAB ships top-level packages of its own (this project's has ``client``, ``server`` and
``shared_models``). This module imports only flwr and the standard library, and forgets the site's own
packages before loading the app, so the app's imports resolve to the FAB's files; the loaded module is
checked to come from the installed FAB.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SITE_PACKAGES = ("client", "server", "shared_models")  # this project's top-level packages


def _forget_site_packages() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in SITE_PACKAGES:
            del sys.modules[name]


def run_installed_app(task_dir: Path) -> None:
    """Install, load and call the app; ``fab`` stays a local here (``client.fab_pinning`` reads it)."""
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.config import get_project_config
    from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supercore.fab import Fab
    from flwr.supercore.task_identity import TaskIdentity

    task = json.loads((task_dir / "task.json").read_text())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task["task_id"], task["run_id"], task["node_id"]
    content = (task_dir / "app.fab").read_bytes()
    fab = Fab(hash_str=task["fab_hash"], content=content, verifications={})
    message = message_from_proto(ProtoMessage.FromString((task_dir / "message.pb").read_bytes()))
    context = context_from_proto(ProtoContext.FromString((task_dir / "context.pb").read_bytes()))

    installed = install_from_fab(fab.content, skip_prompt=True)
    _forget_site_packages()
    app = get_load_client_app_fn(default_app_ref="", app_path=str(installed), multi_app=True)(
        task["fab_id"], task["fab_version"], fab.hash_str)
    module = config_module(get_project_config(installed))
    origin = Path(getattr(sys.modules.get(module), "__file__", "") or "").resolve()
    if installed.resolve() not in origin.parents:
        raise RuntimeError(f"the ClientApp module {module} was loaded from {origin}, not from the FAB in {installed}")

    reply = app(message=message, context=context)
    (task_dir / "reply.pb").write_bytes(message_to_proto(reply).SerializeToString())
    (task_dir / "context_out.pb").write_bytes(context_to_proto(context).SerializeToString())


def config_module(config: dict) -> str:
    """The module of the app's ``[tool.flwr.app.components] clientapp = "module:attr"``."""
    return config["tool"]["flwr"]["app"]["components"]["clientapp"].partition(":")[0]


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m client.app_process TASK_DIR (started by the site runner)", file=sys.stderr)
        return 2
    import logging

    from flwr.supercore.app_utils import start_parent_process_monitor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    start_parent_process_monitor(os.getppid())  # the runner gone: stop too
    run_installed_app(Path(sys.argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
