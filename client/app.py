"""The ClientApp (Flower Message API): one round of local training at this site.

A site starts it through its own runner (``fedvlp-site supernode``: a SuperNode with
``--isolation process`` and the site runner of :mod:`client.site_runner`, which vets the FAB before
starting it and filters its reply), with the site's YAML:
    fedvlp-site supernode --config /abs/site.yaml -- --superlink HOST:PORT \
        --node-config 'site-config="/abs/site.yaml"' ...

Mods, outermost first: the egress guard (only whitelisted content leaves; failures, a bad site config
included, are sanitized), app pinning (refuse app versions the site did not allow), and Flower's
client-side clipping for DP-FedAvg when the server's DP wrapper asks for it. The first two repeat, inside
the app, what the site runner enforces outside it: defence in depth, not the site's guarantee.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from shared_models import wire

from .approvals import site_policy
from .egress import guard
from .fab_pinning import pin_check
from .site_config import SiteConfig, load_site_config
from .train import RoundConfig, train_round

CLIPPING_NORM_KEY = "clipping_norm"  # what Flower's DifferentialPrivacyClientSideFixedClipping sends


def _site_config(context: Context) -> SiteConfig | None:
    path = context.node_config.get("site-config")
    return load_site_config(str(path)) if path else None


def fab_pinning_mod(msg: Message, context: Context, call_next) -> Message:
    site_cfg = _site_config(context)
    if site_cfg is None:  # the app refuses to train without a site config anyway
        return call_next(msg, context)
    return pin_check(msg, context, call_next, site_policy(site_cfg))


def egress_guard_mod(msg: Message, context: Context, call_next) -> Message:
    try:
        site_cfg = _site_config(context)
    except ValueError:  # the app itself reports the config problem (sanitized by the guard)
        site_cfg = None
    return guard(msg, context, call_next, site_cfg)


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` when the round's config carries a clipping norm (client-side DP)."""
    config = msg.content.config_records.get("config")
    if config is not None and CLIPPING_NORM_KEY in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[egress_guard_mod, fab_pinning_mod, dp_clipping_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    site_cfg = _site_config(context)
    if site_cfg is None:
        raise ValueError("this SuperNode has no site config; start it with --node-config 'site-config=\"/abs/site.yaml\"'")
    config = dict(msg.content["config"])
    rc = RoundConfig.from_flat(config)
    received = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    layout = config.get(wire.LAYOUT_KEY)  # the server packs its arrays (shared_models.wire)
    arrays = wire.unpack(received, str(layout)) if layout else received
    result = train_round(site_cfg, arrays, rc)
    out = wire.pack({**arrays, **result.arrays}, str(layout)) if layout else result.arrays
    reply = RecordDict({
        "arrays": ArrayRecord(array_dict={k: Array(v) for k, v in out.items()}),
        "metrics": MetricRecord({"num-examples": result.num_examples, **result.metrics}),
    })
    return Message(reply, reply_to=msg)
