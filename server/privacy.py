"""Client-level differential privacy (DP-FedAvg) with Flower's wrappers and RDP accountant, and the run's
privacy report.

``dp: server`` wraps the run's FedAvg/FedProx in Flower's ``DifferentialPrivacyServerSideFixedClipping``
(the server clips each site's update to ``dp_clipping_norm``, averages unweighted, adds Gaussian noise of
std ``dp_noise_multiplier * dp_clipping_norm / dp_sites_per_round``); ``dp: client`` uses
``DifferentialPrivacyClientSideFixedClipping`` (sites clip before sending, with the site's clipping mod,
so the server never sees an unclipped update). Both carry Flower's ``RdpAccountant``; the round's epsilon
goes into the history, the accountant's ledger into each checkpoint, and a release that would pass
``dp_max_epsilon`` stops the run before the round starts.

Flower's accounted fixed-clipping path claims no amplification by sampling: every round is one Gaussian
release over the ``dp_sites_per_round`` sites it samples, each round samples exactly that many, and all
of them must reply (a round with fewer valid replies releases nothing and is skipped).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)

from .settings import RunSettings

log = logging.getLogger(__name__)

__all__ = ["PrivacyBudgetExhausted", "make_accountant", "dp_wrapper_class", "privacy_state", "write_privacy_report"]

PRIVACY_REPORT = "privacy_report.json"
MECHANISMS = {
    "none": "none: weights and whitelisted aggregate metrics leave each site without a formal privacy guarantee",
    "server": "DP-FedAvg, server-side fixed clipping (Flower DifferentialPrivacyServerSideFixedClipping)",
    "client": "DP-FedAvg, client-side fixed clipping (Flower DifferentialPrivacyClientSideFixedClipping "
              "and the sites' clipping mod)",
}
COVERS = {
    "none": ["nothing formal: only the egress guard's structural checks (weights of the agreed model and "
             "whitelisted scalar metrics; no paths, identifiers or report text)"],
    "server": ["client-level (epsilon, delta)-DP of the sequence of global models against anyone who sees "
               "them (sites, evaluators, whoever gets the released encoder): adding or removing one site's "
               "entire data changes their distribution by at most the epsilon below",
               "the server is trusted: it sees each site's unclipped, un-noised update"],
    "client": ["client-level (epsilon, delta)-DP of the sequence of global models, as for server-side clipping",
               "each site's update is clipped at the site, so the server sees bounded updates; they are still "
               "not noised individually: the server remains trusted with single updates"],
}
NOT_COVERED = [
    "the training metrics each site reports (losses, throughput): Flower's accountant does not include them; "
    "the egress guard limits them to whitelisted scalars",
    "the central evaluation cohort and anything derived from it",
    "amplification by sampling is not claimed (Flower's accounted fixed-clipping path), so the epsilon is "
    "conservative for sampled sites",
    "sample-level guarantees for single patients, unless a site also runs DP-SGD (listed per site below); "
    "client-level DP protects a whole site's data, which implies each patient's, at the same epsilon",
]


def make_accountant(settings: RunSettings):
    """Flower's RDP accountant for the run's DP settings (``flwr[dp]``)."""
    from flwr.serverapp import RdpAccountant  # needs dp-accounting (the flwr[dp] extra)

    config = PrivacyConfig(
        target_delta=settings.dp_target_delta,
        population_size=settings.dp_sites_per_round,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=settings.dp_max_epsilon or None,
    )
    return RdpAccountant(config)


def dp_wrapper_class(settings: RunSettings):
    return (DifferentialPrivacyServerSideFixedClipping if settings.dp == "server"
            else DifferentialPrivacyClientSideFixedClipping)


def check_dp_settings(settings: RunSettings) -> None:
    if settings.dp == "none":
        return
    if settings.strategy == "fedadam":
        raise ValueError("dp: Flower's accounted DP wrappers need FedAvg's aggregation; use strategy fedavg or "
                         "fedprox with dp, or dp: none with fedadam.")
    if settings.dp_sites_per_round < 1:
        raise ValueError("dp_sites_per_round should be >= 1 (the sites every DP round samples, all of which must reply).")
    if not settings.dp_noise_multiplier > 0 or not settings.dp_clipping_norm > 0:
        raise ValueError(f"dp_noise_multiplier and dp_clipping_norm should be > 0, got "
                         f"{settings.dp_noise_multiplier} and {settings.dp_clipping_norm}.")
    if not 0 < settings.dp_target_delta < 1:
        raise ValueError(f"dp_target_delta should be in (0, 1), got {settings.dp_target_delta}.")
    if settings.dp_max_epsilon < 0:
        raise ValueError(f"dp_max_epsilon should be > 0 (or 0 for no limit), got {settings.dp_max_epsilon}.")


def privacy_state(strategy) -> dict[str, Any] | None:
    """Epsilon spent so far, for the round's history record (None without DP)."""
    accountant = getattr(strategy, "accountant", None)
    if accountant is None:
        return None
    spent = accountant.get_privacy_spent()
    return {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases,
            "accounting": spent.accounting_method}


def site_dp_from_history(history: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The latest sample-level (DP-SGD) epsilon each replying node reported."""
    sites: dict[str, dict[str, Any]] = {}
    for record in history:
        for site in (record.get("participation") or {}).get("sites", []):
            if site.get("dp-epsilon") is not None:
                sites[str(site["node"])] = {"epsilon": site["dp-epsilon"], "delta": site.get("dp-delta"),
                                            "noise_multiplier": site.get("dp-noise-multiplier"),
                                            "max_grad_norm": site.get("dp-max-grad-norm"),
                                            "round": record.get("round")}
    return sites


def load_privacy_report(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / PRIVACY_REPORT
    return json.loads(path.read_text()) if path.is_file() else None


def privacy_lines(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) rows of a privacy report, for the Markdown and HTML run reports."""
    rows = [("mechanism", report["mechanism"])]
    client = report.get("client_level")
    if client:
        rows += [("client-level epsilon spent", f"{client['epsilon_spent']:.4g} at delta {client['delta']:g} "
                                                f"after {client['releases']} releases"),
                 ("parameters", f"noise multiplier {client['noise_multiplier']}, clipping norm {client['clipping_norm']}, "
                                f"{client['sites_per_round']} sites per round, max epsilon {client['max_epsilon']}")]
    for node, site in sorted(report.get("sample_level_by_site", {}).items()):
        rows.append((f"DP-SGD at node {node}", f"epsilon {site['epsilon']:.4g} at delta {site['delta']:g} "
                                               f"(noise {site['noise_multiplier']}, clip {site['max_grad_norm']}, "
                                               f"round {site['round']})"))
    rows += [("covers", c) for c in report["covers"]] + [("does not cover", c) for c in report["does_not_cover"]]
    if report.get("stopped"):
        rows.append(("run stopped", report["stopped"]))
    return rows


def write_privacy_report(run_dir: str | Path, settings: RunSettings, history: list[dict[str, Any]],
                         stopped: str | None = None) -> dict[str, Any]:
    """Write ``privacy_report.json`` in the run folder: mechanism, parameters, spent budget, coverage."""
    spent = next((r["privacy"] for r in reversed(history) if r.get("privacy")), None)
    report: dict[str, Any] = {
        "mechanism": MECHANISMS[settings.dp],
        "client_level": None if settings.dp == "none" else {
            "noise_multiplier": settings.dp_noise_multiplier, "clipping_norm": settings.dp_clipping_norm,
            "sites_per_round": settings.dp_sites_per_round, "target_delta": settings.dp_target_delta,
            "max_epsilon": settings.dp_max_epsilon or None,
            "noise_std_per_parameter": settings.dp_noise_multiplier * settings.dp_clipping_norm
            / settings.dp_sites_per_round,
            "epsilon_spent": spent["epsilon"] if spent else 0.0, "delta": settings.dp_target_delta,
            "releases": spent["releases"] if spent else 0, "accountant": "Flower RdpAccountant (dp-accounting), "
            "add-or-remove-one site, no amplification by sampling",
        },
        "sample_level_by_site": site_dp_from_history(history),
        "covers": COVERS[settings.dp],
        "does_not_cover": NOT_COVERED,
        "rounds_recorded": len(history),
        "stopped": stopped,
    }
    path = Path(run_dir) / PRIVACY_REPORT
    path.write_text(json.dumps(report, indent=2, sort_keys=True))
    return report

