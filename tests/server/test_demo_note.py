"""The demo's one line on what its budget can and cannot show, and where the reports print it."""

from __future__ import annotations

import json

from server.demo import budget_note
from server.evaluation.html_report import write_html_report
from server.evaluation.report import write_run_report

HISTORY = [{"round": r, "lr": 1e-3, "skipped": False, "wall_seconds": 10.0, "train": {"local-steps": 30.0},
            "bytes_received": 3000, "bytes_sent_per_site": 1000,
            "participation": {"sampled": 3, "replied": 3, "valid": 3, "rejected": [], "errors": []}} for r in (1, 2, 3)]
EVALUATION = {"zero_shot.per_finding": {
    "Pleural effusion": {"auroc": 0.95, "ci_low": 0.85, "ci_high": 1.0},
    "Lung nodule": {"auroc": 0.55, "ci_low": 0.38, "ci_high": 0.71},
    "Atelectasis": {"auroc": None, "ci_low": None, "ci_high": None},  # no positives: not a finding to name
}}


def test_the_note_names_what_was_learned_and_what_was_not_from_the_runs_own_figures():
    note = budget_note(EVALUATION, HISTORY, studies=30, sites=3)
    assert note.startswith("3 rounds (90 local steps in all per site) on 30 synthetic phantom studies at each of 3 sites")
    learned, rest = note.split("too little", 1)
    assert "interval above chance: Pleural effusion)" in learned
    assert "Pleural effusion" in learned and "Lung nodule" not in learned
    assert "Lung nodule" in rest and "Atelectasis" not in note
    assert "above chance: none yet" in budget_note({"zero_shot.per_finding": {}}, HISTORY, 30, 3)


def test_both_reports_print_the_note(tmp_path):
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HISTORY))
    note = budget_note(EVALUATION, HISTORY, studies=30, sites=3)
    markdown = write_run_report(tmp_path, tmp_path / "report.md", note=note).read_text()
    assert f"What this shows: {note}" in markdown.splitlines()
    page = write_html_report({"cohort.studies": 40}, tmp_path / "r.html", note="a <b> budget").read_text()
    assert "<b>What this shows:</b> a &lt;b&gt; budget" in page
    assert "What this shows" not in write_html_report({"cohort.studies": 40}, tmp_path / "s.html").read_text()
