"""Server-side fixtures: an in-process Flower Grid over real or crafted node handlers, and tiny sites.

``InProcessGrid`` delivers each message to a per-node handler after a protobuf round trip (as a
SuperLink would), so nodes and server share no objects. A handler is the real ClientApp (``None``),
a function ``(msg, context) -> Message``, a function that raises (the reply carries an Error, as a
SuperNode makes it), or ``"dead"`` (no reply at all, as after a SIGKILL).
"""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

import pytest
import yaml
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

TINY_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
# The tiny preset shrunk further (32^3 volumes, a 2-block ViT, 1-block decoders): ~10x faster rounds on a CPU.
SMALL = {"preprocess": {"size": [32, 32, 32]}, "vision": {"width": 96, "depth": 2, "heads": 2},
         "decoder": {"width": 64, "layers": 1, "heads": 2}, "mae": {"decoder_width": 64, "decoder_heads": 2}}
DEAD = "dead"
REPORTS = ['"Small left pleural effusion. The heart is enlarged."', '"No pleural effusion. A 12 mm nodule."',
           '"Emphysema. No nodules. Cardiomegaly."']


def wire(msg: Message) -> Message:
    """The message as the other side sees it: serialized to bytes and parsed back."""
    proto = ProtoMessage()
    proto.ParseFromString(message_to_proto(msg).SerializeToString())
    return message_from_proto(proto)


class InProcessGrid(Grid):
    """N nodes, each with its own Context (node_config, state); ``received`` keeps what the nodes got.

    Replies come back at once; a dead node's reply is simply missing (as when a round's timeout ends).
    """

    def __init__(self, handlers: dict, node_configs: dict | None = None, run_config: dict | None = None):
        self.handlers = dict(handlers)
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config=dict((node_configs or {}).get(nid, {})),
                                      state=RecordDict(), run_config=dict(run_config or {})) for nid in handlers}
        self.received: list[Message] = []  # instructions as the nodes got them
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(1)
        # what a ServerApp process sets before its strategy builds messages
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.handlers)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            handler = self.handlers[node]
            if isinstance(handler, str) and handler == DEAD:
                continue
            delivered = wire(msg)
            self.received.append(delivered)
            try:
                reply = (handler or _client_app())(delivered, self.contexts[node])
            except Exception as ex:  # what run_clientapp does with a ClientApp's exception
                reason = str(type(ex)) + ":<'" + str(ex) + "'>"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=delivered)
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self._replies[msg.metadata.message_id] = wire(reply)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def _client_app():
    from client.app import app

    return app


@pytest.fixture
def inprocess_grid():
    """``inprocess_grid(handlers, node_configs=None, run_config=None)``: handlers maps a node id (not 1, the
    SuperLink's) to None (the real ClientApp), a function ``(msg, context) -> Message``, or ``"dead"``."""
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    yield lambda handlers, node_configs=None, run_config=None: InProcessGrid(handlers, node_configs, run_config)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _write_ct_series():
    """The CT-series and site-YAML writers of tests/client/conftest.py (not a package: loaded by path)."""
    path = Path(__file__).parents[1] / "client" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_client_test_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_ct_series, module.write_site_yaml


def tiny_model_yaml(path: Path, **sections) -> Path:
    """A model YAML: the tiny preset (or ``preset=``) with a tiny random text encoder, plus overrides."""
    data = {"preset": "tiny", "text": {"random_init": TINY_TEXT}, **SMALL, **sections}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def model_yaml_writer():
    """``model_yaml_writer(path, **sections)``: see :func:`tiny_model_yaml`."""
    return tiny_model_yaml


@pytest.fixture
def tiny_sites(tmp_path):
    """``tiny_sites(n, model_yaml=None)`` -> (site YAML paths, model YAML path): n ingested small sites."""
    write_ct_series, write_site_yaml = _write_ct_series()
    made = [0]

    def make(n: int = 2, model_yaml: Path | None = None):
        from client.ingest.pipeline import run_ingest
        from client.site_config import load_site_config

        made[0] += 1
        root = tmp_path / f"sites{made[0]}"
        root.mkdir()
        model_yaml = model_yaml or tiny_model_yaml(root / "model.yaml")
        paths = []
        for s in range(n):
            site = root / f"site{s}"
            for i in range(3):
                uid = f"1.2.{s}.{i}"
                write_ct_series(site / "dicom" / f"s{i}", uid, f"{uid}.1", f"ACC{i}", slices=10 + i, seed=10 * s + i)
            (site / "reports.csv").write_text("AccessionNumber,ReportText\n" +
                                              "".join(f"ACC{i},{r}\n" for i, r in enumerate(REPORTS)))
            path = write_site_yaml(site, site_id=f"site-{s}", model=str(model_yaml),
                                   compute={"batch_size": 2, "workers": 0, "device": "cpu"},
                                   # in process there is no FAB to hash: these sites run the app they are given
                                   privacy={"allowed_fab_hashes": "any"})
            run_ingest(load_site_config(path), progress=False)
            paths.append(path)
        return paths, model_yaml

    return make
