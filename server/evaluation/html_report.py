"""A self-contained HTML evaluation report: tables, ROC curves per finding, metrics by round, examples.

Plots are PNGs embedded as base64, so the one file can be mailed to an ethics board or a colleague.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _fmt(value: Any) -> str:
    if value is None:
        return "undefined"
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def roc_figure(roc: dict[str, tuple[list[int], list[float]]], aurocs: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    defined = [f for f, (y, _) in roc.items() if 0 < sum(y) < len(y)]
    cols = 4
    rows = max(1, -(-len(defined) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, finding in zip(axes.flat, defined):
        y, s = roc[finding]
        fpr, tpr, _ = roc_curve(y, s)
        ax.axis("on")
        ax.plot(fpr, tpr, lw=1.5)
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
        ax.set_title(f"{finding}\nAUROC {_fmt(aurocs.get(finding, {}).get('auroc'))}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


def rounds_figure(history: list[dict[str, Any]]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return None
    rounds = [h["round"] for h in history]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 3.6))
    for key in sorted({k for h in history for k in h.get("train", {}) if k.startswith("loss.")}):
        left.plot(rounds, [h["train"].get(key) for h in history], marker="o", label=key[5:])
    left.set(title="local training losses", xlabel="round")
    left.legend(fontsize=7)
    evaluated = [h for h in history if h.get("evaluation")]
    numeric = sorted({k for h in evaluated for k, v in h["evaluation"].items() if isinstance(v, (int, float))})
    for key in (k for k in numeric if k.startswith("validation.")):
        middle.plot([h["round"] for h in evaluated], [h["evaluation"].get(key) for h in evaluated], marker="o",
                    label=key[len("validation."):])
    middle.set(title="validation losses (central cohort)", xlabel="round")
    # scores share a [0, 1] axis: AUROCs (chance 0.5), recall@5, and the embeddings' mean pairwise cosine
    # (near 1 = collapsed)
    for key in (k for k in numeric if k.endswith("macro_auroc") and not k.startswith("zero_shot_styles")
                or k.endswith("report_to_volume.recall@5") or k.endswith("_mean_cosine")):
        right.plot([h["round"] for h in evaluated], [h["evaluation"].get(key) for h in evaluated], marker="o",
                   ls=":" if key.endswith("_mean_cosine") else "-", label=key)
    right.axhline(0.5, color="grey", lw=0.8, ls="--")
    right.set(title="central evaluation scores", xlabel="round", ylim=(0, 1.02))
    for ax in (middle, right):
        if evaluated:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def write_html_report(metrics: dict[str, Any], out: str | Path, roc: dict | None = None,
                      history: list[dict[str, Any]] | None = None, title: str = "fedvlp evaluation",
                      privacy: list[tuple[str, str]] | None = None, note: str | None = None) -> Path:
    """Write the HTML report; ``roc`` is ``{finding: (labels, scores)}``, ``history`` the run's rounds,
    ``privacy`` the run's privacy report as (label, text) rows, ``note`` a line on what the figures can
    and cannot show (printed under the title)."""
    out = Path(out)
    headline = [k for k in ("zero_shot.macro_auroc", "findings_head.macro_auroc", "probe.macro_auroc",
                            "retrieval.report_to_volume.recall@5", "retrieval.volume_to_report.recall@5",
                            "generation.bleu4", "generation.rougeL", "generation.clinical_f1", "segmentation.mean_dice",
                            "segmentation_organs.mean_dice", "embeddings.volume_mean_cosine",
                            "embeddings.text_mean_cosine")
                if k in metrics]
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}</style>",
             f"<h1>{html.escape(title)}</h1>", f"<p>{metrics.get('cohort.studies', '?')} studies in the cohort.</p>",
             *([f"<p><b>What this shows:</b> {html.escape(note)}</p>"] if note else []),
             "<h2>Summary</h2><table><tr><th>metric</th><th>value</th></tr>"]
    parts += [f"<tr><td>{k}</td><td>{_fmt(metrics[k])}</td></tr>" for k in headline]
    ci = metrics.get("zero_shot.macro_ci")
    if ci:
        parts.append(f"<tr><td>zero_shot.macro_auroc 95% CI</td><td>{_fmt(ci[0])} - {_fmt(ci[1])}</td></tr>")
    parts.append("</table>")
    per = metrics.get("zero_shot.per_finding", {})
    if per:
        parts.append("<h2>Zero-shot per finding</h2><table><tr><th>finding</th><th>AUROC</th><th>95% CI</th>"
                     "<th>positives</th><th>negatives</th></tr>")
        for name, v in per.items():
            parts.append(f"<tr><td>{html.escape(name)}</td><td>{_fmt(v.get('auroc'))}</td><td>{_fmt(v.get('ci_low'))} - "
                         f"{_fmt(v.get('ci_high'))}</td><td>{v.get('positives')}</td><td>{v.get('negatives')}</td></tr>")
        parts.append("</table>")
    if roc:
        parts.append(f"<h2>ROC curves (zero-shot)</h2><img src='{roc_figure(roc, per)}'>")
    retrieval = {k: v for k, v in metrics.items() if k.startswith("retrieval.")}
    if retrieval:
        parts.append("<h2>Retrieval</h2><table><tr><th>metric</th><th>value</th></tr>")
        parts += [f"<tr><td>{k}</td><td>{_fmt(v)}</td></tr>" for k, v in sorted(retrieval.items())]
        parts.append("</table>")
    figure = rounds_figure(history or [])
    if figure:
        parts.append(f"<h2>Metrics by round</h2><img src='{figure}'>")
    examples = metrics.get("generation.examples", [])
    if examples:
        parts.append("<h2>Generated reports</h2><table><tr><th>reference</th><th>generated</th></tr>")
        parts += [f"<tr><td>{html.escape(e['reference'])}</td><td>{html.escape(e['generated'])}</td></tr>" for e in examples]
        parts.append("</table>")
    if privacy:
        parts.append("<h2>Privacy</h2><table>")
        parts += [f"<tr><td>{html.escape(label)}</td><td>{html.escape(text)}</td></tr>" for label, text in privacy]
        parts.append("</table>")
    parts.append("<h2>All metrics</h2><pre>" + html.escape(json.dumps(
        {k: v for k, v in metrics.items() if not k.startswith("_")}, indent=1, sort_keys=True)) + "</pre>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
