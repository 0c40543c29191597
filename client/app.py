"""The ClientApp (Flower Message API): one round of local training at this site.

A SuperNode starts it with the site's YAML:
    flower-supernode --superlink HOST:PORT --node-config 'site-config="/abs/site.yaml"' ...
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .site_config import load_site_config
from .train import RoundConfig, train_round

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    path = context.node_config.get("site-config")
    if not path:
        raise ValueError("this SuperNode has no site config; start it with --node-config 'site-config=\"/abs/site.yaml\"'")
    site_cfg = load_site_config(str(path))
    rc = RoundConfig.from_flat(dict(msg.content["config"]))
    arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    result = train_round(site_cfg, arrays, rc)
    reply = RecordDict({
        "arrays": ArrayRecord(array_dict={k: Array(v) for k, v in result.arrays.items()}),
        "metrics": MetricRecord({"num-examples": result.num_examples, **result.metrics}),
    })
    return Message(reply, reply_to=msg)
