"""The run report: per-round participation and losses from the history, and the central evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


HEADLINE = ("zero_shot.macro_auroc", "findings_head.macro_auroc", "probe.macro_auroc",
            "retrieval.report_to_volume.recall@5", "retrieval.report_to_volume.chance@5", "generation.bleu4",
            "generation.rougeL", "generation.clinical_f1", "segmentation.mean_dice")


def write_run_report(run_dir: str | Path, out: str | Path, wall_seconds: float | None = None,
                     evaluation: dict[str, Any] | None = None, html: Path | None = None,
                     note: str | None = None) -> Path:
    """A Markdown report of a run folder (``history.jsonl``), with a final evaluation if given and a
    line (``note``) on what its figures can and cannot show."""
    run_dir, out = Path(run_dir), Path(out)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]
    lines = [f"# Federated run report: {run_dir}", ""]
    if note:
        lines += [f"What this shows: {note}", ""]
    if wall_seconds is not None:
        lines += [f"Wall time: {wall_seconds:.0f} s.", ""]
    lines += ["## Rounds", "", "| round | sites sampled | replied | valid | rejected / errors | skipped | lr | train loss "
              "| wall s | overhead s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in history:
        p = r["participation"]
        problems = "; ".join(f"{x['reason']}" for x in p["rejected"] + p["errors"]) or "-"
        lines.append(f"| {r['round']} | {p['sampled']} | {p['replied']} | {p['valid']} | {problems} | "
                     f"{'yes' if r['skipped'] else 'no'} | {r['lr']:.2e} | {_fmt(r['train'].get('train-loss', '-'))} | "
                     f"{r['wall_seconds']:.1f} | {_fmt(r.get('overhead_seconds', '-'))} |")
    losses = sorted({k for r in history for k in r["train"] if k.startswith("loss.")})
    if losses:
        lines += ["", "## Local training losses (example-weighted mean over sites)", "",
                  "| round | " + " | ".join(k[5:] for k in losses) + " |", "|---" * (len(losses) + 1) + "|"]
        for r in history:
            lines.append(f"| {r['round']} | " + " | ".join(_fmt(r["train"].get(k, "-")) for k in losses) + " |")
    evaluated = [r for r in history if r.get("evaluation")]
    if evaluated:
        keys = sorted({k for r in evaluated for k, v in r["evaluation"].items()
                       if k.startswith("validation.total") or k in HEADLINE})
        lines += ["", "## Central evaluation (held-out cohort)", "", "| round | " + " | ".join(keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]
        for r in evaluated:
            lines.append(f"| {r['round']} | " + " | ".join(_fmt(r["evaluation"].get(k, "-")) for k in keys) + " |")
    if evaluation:
        lines += ["", "## Final evaluation of the global model (held-out cohort)", ""]
        ci = evaluation.get("zero_shot.macro_ci") or [None, None]
        for key in HEADLINE:
            if key in evaluation:
                extra = f" (95% CI {_fmt(ci[0])}-{_fmt(ci[1])})" if key == "zero_shot.macro_auroc" and ci[0] else ""
                lines.append(f"- {key}: {_fmt(evaluation[key])}{extra}")
        if html:
            lines.append(f"- full report with ROC curves and example reports: {html}")
    from ..privacy import load_privacy_report, privacy_lines

    privacy = load_privacy_report(run_dir)
    if privacy:
        lines += ["", "## Privacy", ""] + [f"- {label}: {text}" for label, text in privacy_lines(privacy)]
    traffic = history[-1]
    lines += ["", "Overhead: round wall time minus the slowest site's local training time (process start-up, "
              "model build, transfer of the weights, aggregation, checkpointing; not the central evaluation).", ""]
    lines += ["", f"Bytes sent to each site per round: {traffic['bytes_sent_per_site'] / 1e6:.1f} MB; "
              f"received per round (all sites): {traffic['bytes_received'] / 1e6:.1f} MB.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out
