"""Client-level DP (Flower's fixed-clipping wrappers + RDP accountant) in the federated loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from server.checkpoint import RunFolder, load_arrays_file
from server.federation import run_federation
from server.privacy import PRIVACY_REPORT, make_accountant
from server.settings import RunSettings, settings_from_run_config
from server.strategy import build_strategy

DP = dict(dp="server", dp_noise_multiplier=1.1, dp_clipping_norm=0.5, dp_sites_per_round=2, dp_target_delta=1e-5)


def settings(model_yaml, run_dir, **kw):
    base = dict(preset=str(model_yaml), rounds=3, local_steps=1, min_replies=2, min_available=2,
                run_dir=str(run_dir), objectives={"clip": 1}, max_update_norm=1e6, evaluate_every=100)
    return RunSettings(**{**base, **DP, **kw})


def shift(amount: float):
    """A node that adds ``amount`` to every weight (an update of L2 norm amount * sqrt(#weights))."""
    def handler(msg, context):
        arrays = {k: Array(v.numpy() + np.float32(amount)) for k, v in msg.content["arrays"].items()}
        return Message(RecordDict({"arrays": ArrayRecord(array_dict=arrays),
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
    return handler


def opacus_epsilon(noise_multiplier: float, releases: int, delta: float, orders) -> float:
    """The same schedule, accounted independently with opacus's RDP analysis (unsampled Gaussian, q = 1)."""
    rdp = compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=releases, orders=list(orders))
    eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


@pytest.mark.parametrize("sigma,releases", [(1.1, 1), (1.1, 7), (0.8, 30), (3.0, 200)])
def test_the_accountant_matches_an_independent_rdp_computation(sigma, releases, tmp_path, model_yaml_writer):
    s = settings(model_yaml_writer(tmp_path / "m.yaml"), tmp_path / "run", dp_noise_multiplier=sigma)
    accountant = make_accountant(s)
    from flwr.serverapp import GaussianPrivacyEvent

    accountant.compose(GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=2, population_size=2), releases)
    ours = accountant.get_privacy_spent().epsilon
    orders = accountant.state_dict()["orders"]
    assert ours == pytest.approx(opacus_epsilon(sigma, releases, 1e-5, orders), abs=1e-6)
    assert ours > 0


def test_a_dp_round_clips_averages_and_adds_the_calibrated_noise(tmp_path, inprocess_grid, model_yaml_writer):
    s = settings(model_yaml_writer(tmp_path / "m.yaml"), tmp_path / "run", rounds=1, dp_noise_multiplier=0.5)
    summary = run_federation(inprocess_grid({101: shift(0.01), 102: shift(0.01)}), s)
    folder = RunFolder(s.run_dir)
    start = load_arrays_file(folder.checkpoints / "round_0000" / "global.safetensors")
    diff = np.concatenate([(summary["final_arrays"][k].astype(np.float64) - start[k]).ravel() for k in start])
    n = diff.size
    clipped_shift = 0.01 * min(1.0, 0.5 / (0.01 * np.sqrt(n)))  # each update clipped to norm 0.5
    std = 0.5 * 0.5 / 2  # noise_multiplier * clipping_norm / sites
    assert diff.mean() == pytest.approx(clipped_shift, abs=5 * std / np.sqrt(n))
    assert diff.std() == pytest.approx(std, rel=0.02)
    record = folder.history()[0]
    assert record["privacy"]["releases"] == 1 and record["privacy"]["delta"] == 1e-5
    assert record["privacy"]["epsilon"] == pytest.approx(
        opacus_epsilon(0.5, 1, 1e-5, make_accountant(s).state_dict()["orders"]), abs=1e-6)


@pytest.mark.parametrize("mode,released", [("server", True), ("client", False)])
def test_a_large_update_is_clipped_under_server_side_dp_and_refused_under_client_side(
        mode, released, tmp_path, inprocess_grid, model_yaml_writer):
    """Server-side clipping exists to bound large updates: one far past max_update_norm is clipped and the
    round released. With client-side clipping such an update means the site did not clip: refused."""
    s = settings(model_yaml_writer(tmp_path / "m.yaml"), tmp_path / "run", rounds=1, dp=mode, max_update_norm=1.0)
    run_federation(inprocess_grid({101: shift(1.0), 102: shift(1.0)}), s)  # norm sqrt(#weights) >> 1
    record = RunFolder(s.run_dir).history()[0]
    assert record["skipped"] is not released and record["privacy"]["releases"] == int(released)
    assert len(record["participation"]["rejected"]) == (0 if released else 2)


def test_the_budget_stops_the_run_cleanly_and_a_resume_keeps_what_was_spent(tmp_path, inprocess_grid,
                                                                           model_yaml_writer):
    model_yaml = model_yaml_writer(tmp_path / "m.yaml")
    probe = make_accountant(settings(model_yaml, tmp_path / "x"))
    from flwr.serverapp import GaussianPrivacyEvent

    event = GaussianPrivacyEvent(noise_multiplier=1.1, sample_size=2, population_size=2)
    eps = []
    for _ in range(4):
        probe.compose(event)
        eps.append(probe.get_privacy_spent().epsilon)
    budget = (eps[1] + eps[2]) / 2  # room for two releases, not three
    s = settings(model_yaml, tmp_path / "run", rounds=5, dp_max_epsilon=budget)
    grid = lambda: inprocess_grid({101: shift(1e-4), 102: shift(1e-4)})  # noqa: E731

    summary = run_federation(grid(), s)
    folder = RunFolder(s.run_dir)
    assert summary["rounds_completed"] == 2 and "privacy budget exhausted before round 3" in summary["stopped"]
    assert folder.latest().round == 2
    assert [r["privacy"]["epsilon"] for r in folder.history()] == pytest.approx(eps[:2], abs=1e-9)
    report = json.loads((folder.root / PRIVACY_REPORT).read_text())
    assert report["stopped"].startswith("privacy budget exhausted")
    assert report["client_level"]["epsilon_spent"] == pytest.approx(eps[1], abs=1e-9)
    assert report["client_level"]["releases"] == 2

    again = run_federation(grid(), s)  # the same budget: still exhausted, nothing more is released
    assert again["rounds_completed"] == 2 and again["stopped"] and len(folder.history()) == 2

    more = settings(model_yaml, s.run_dir, rounds=5, dp_max_epsilon=eps[3] + 1e-6)
    with pytest.raises(ValueError, match="cannot resume the DP budget"):  # another budget is another config
        run_federation(grid(), more)
    state = json.loads((folder.latest().path / "state.json").read_text())
    assert len(state["accountant"]["compositions"]) == 2


def test_a_resumed_dp_run_continues_the_same_ledger(tmp_path, inprocess_grid, model_yaml_writer):
    model_yaml = model_yaml_writer(tmp_path / "m.yaml")
    s2 = settings(model_yaml, tmp_path / "run", rounds=2)
    run_federation(inprocess_grid({101: shift(1e-4), 102: shift(1e-4)}), s2)
    s4 = settings(model_yaml, tmp_path / "run", rounds=4)
    run_federation(inprocess_grid({101: shift(1e-4), 102: shift(1e-4)}), s4)
    straight = settings(model_yaml, tmp_path / "straight", rounds=4)
    run_federation(inprocess_grid({101: shift(1e-4), 102: shift(1e-4)}), straight)
    resumed = [r["privacy"]["epsilon"] for r in RunFolder(s4.run_dir).history()]
    assert resumed == pytest.approx([r["privacy"]["epsilon"] for r in RunFolder(straight.run_dir).history()], abs=1e-9)
    assert resumed[3] > resumed[2] > resumed[1]


def test_a_round_missing_a_sampled_site_releases_nothing(tmp_path, inprocess_grid, model_yaml_writer):
    # a dead site's reply is awaited until the round's timeout: keep it short here
    s = settings(model_yaml_writer(tmp_path / "m.yaml"), tmp_path / "run", rounds=2, round_timeout_s=1.0)
    summary = run_federation(inprocess_grid({101: shift(1e-4), 102: "dead"}), s)
    history = RunFolder(s.run_dir).history()
    assert summary["rounds_skipped"] == 2 and all(r["skipped"] for r in history)
    assert all(r["privacy"]["releases"] == 0 and r["privacy"]["epsilon"] == 0 for r in history)


def test_client_side_clipping_sends_the_norm_and_sites_clip(tmp_path, inprocess_grid, model_yaml_writer):
    """dp: client puts the clipping norm in the round config; the site's mod (Flower's fixedclipping_mod)
    clips the update before it leaves, so the server only ever sees bounded updates."""
    from client.app import dp_clipping_mod

    s = settings(model_yaml_writer(tmp_path / "m.yaml"), tmp_path / "run", rounds=1, dp="client")
    seen_norms = []

    def site(msg, context):
        sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        reply = dp_clipping_mod(msg, context, shift(0.05))
        got = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        seen_norms.append(np.sqrt(sum(float(np.sum((got[k].astype(np.float64) - sent[k]) ** 2)) for k in sent)))
        assert msg.content["config"]["uniform_weights"] is True
        return reply

    run_federation(inprocess_grid({101: site, 102: site}), s)
    assert seen_norms == pytest.approx([0.5, 0.5], rel=1e-3)  # float32 weights


def test_dp_settings_are_checked():
    with pytest.raises(ValueError, match="dp should be one of"):
        RunSettings(dp="local")
    with pytest.raises(ValueError, match="use strategy fedavg or fedprox"):
        build_strategy(RunSettings(dp="server", strategy="fedadam"))
    with pytest.raises(ValueError, match="dp_noise_multiplier and dp_clipping_norm"):
        build_strategy(RunSettings(dp="server", dp_noise_multiplier=0.0))
    s = settings_from_run_config({"recipe": "tiny", "dp": "server", "dp-noise-multiplier": 0.7,
                                  "dp-max-epsilon": 8.0, "dp-sites-per-round": 3})
    assert (s.dp, s.dp_noise_multiplier, s.dp_max_epsilon, s.dp_sites_per_round) == ("server", 0.7, 8.0, 3)
    strategy = build_strategy(s)
    assert strategy.num_sampled_clients == 3 and strategy.min_replies == 3
    assert strategy.accountant.config.max_epsilon == 8.0


def test_the_run_reports_carry_the_privacy_report(tmp_path, inprocess_grid, model_yaml_writer):
    from server.evaluation.html_report import write_html_report
    from server.evaluation.report import write_run_report
    from server.privacy import load_privacy_report, privacy_lines

    s = settings(model_yaml_writer(tmp_path / "m.yaml"), tmp_path / "run", rounds=2)
    run_federation(inprocess_grid({101: shift(1e-4), 102: shift(1e-4)}), s)
    report = load_privacy_report(s.run_dir)
    epsilon = RunFolder(s.run_dir).history()[-1]["privacy"]["epsilon"]
    assert report["client_level"]["epsilon_spent"] == epsilon and report["client_level"]["releases"] == 2
    markdown = write_run_report(s.run_dir, tmp_path / "report.md").read_text()
    assert "## Privacy" in markdown and f"{epsilon:.4g} at delta 1e-05 after 2 releases" in markdown
    assert "does not cover" in markdown
    page = write_html_report({"cohort.studies": 1}, tmp_path / "r.html", privacy=privacy_lines(report)).read_text()
    assert "<h2>Privacy</h2>" in page and "server-side fixed clipping" in page


def test_a_run_without_dp_says_it_has_no_formal_guarantee(tmp_path, inprocess_grid, model_yaml_writer):
    s = settings(model_yaml_writer(tmp_path / "m.yaml"), tmp_path / "run", rounds=1, dp="none")
    run_federation(inprocess_grid({101: shift(1e-4), 102: shift(1e-4)}), s)
    report = json.loads((RunFolder(s.run_dir).root / PRIVACY_REPORT).read_text())
    assert report["client_level"] is None and report["mechanism"].startswith("none")
    assert "privacy" not in RunFolder(s.run_dir).history()[0]
