"""``fedvlp-site ingest``: PACS export -> validated, preprocessed, labelled cache, every input accounted for.

Stages: discover files (DICOM by content) -> read headers (cached per file) -> group into series and
studies -> join reports -> load, preprocess and cache each new or changed series (unchanged ones are
reused) -> label findings -> write ``manifest.jsonl``, ``quarantine.jsonl`` and ``ingest_report.json``.
One bad file, series or report row never stops an ingest: each ends with a named reason.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from shared_models.reports import report_body

from ..labelers import build_labeler
from . import reasons
from .cache import INGEST_REPORT, MANIFEST, QUARANTINE, read_manifest, volume_path, write_atomic, write_jsonl
from .discovery import walk_export
from .file_index import FileIndex
from .reasons import IngestError
from .report_export import read_report_export
from .series_job import process_series

log = logging.getLogger(__name__)
PIPELINE_VERSION = "1"
SKIPPED = {reasons.NOT_DICOM, reasons.NOT_AN_IMAGE_SERIES, reasons.MODALITY_NOT_SELECTED, reasons.DUPLICATE_FILE,
           reasons.SERIES_TOO_SMALL, reasons.NO_MATCHING_REPORT}
"""Reasons that are expected in a normal export (counted as skipped); every other reason is a failure."""


class Accounting:
    """The fate of every input file (and report row): ingested, or one reason with a detail."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[str, str]] = {}  # path -> (reason or "", detail)
        self.report_rows: list[dict[str, str]] = []

    def ingested(self, path: str) -> None:
        self.files[path] = ("", "")

    def refuse(self, path: str, reason: str, detail: str = "") -> None:
        self.files[path] = (reason, detail)

    def summary(self) -> dict[str, Any]:
        by_reason: dict[str, list[str]] = defaultdict(list)
        for path, (reason, _) in self.files.items():
            if reason:
                by_reason[reason].append(path)
        ingested = sum(1 for reason, _ in self.files.values() if not reason)
        skipped = sum(len(p) for r, p in by_reason.items() if r in SKIPPED)
        return {
            "files": {"seen": len(self.files), "ingested": ingested, "skipped": skipped,
                      "failed": len(self.files) - ingested - skipped},
            "reasons": {
                reason: {"kind": "skipped" if reason in SKIPPED else "failed", "count": len(paths),
                         "examples": sorted(paths)[:5]}
                for reason, paths in sorted(by_reason.items())
            },
        }

    def quarantine(self) -> list[dict[str, str]]:
        rows = [{"input": p, "reason": r, "detail": d} for p, (r, d) in sorted(self.files.items()) if r]
        return rows + self.report_rows


def preprocess_fingerprint(pcfg) -> str:
    payload = json.dumps([PIPELINE_VERSION, dataclasses.asdict(pcfg)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def series_key(study_uid: str, series_uid: str) -> str:
    return hashlib.sha256(f"{study_uid}/{series_uid}".encode()).hexdigest()[:24]


class CacheFolderError(ValueError):
    """The site's cache folder cannot hold a cache (named, with what to do)."""


def _check_cache_folder(cache_dir: Path) -> None:
    """Refuse, before any input is read, a cache_dir that is a file or cannot be written."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise CacheFolderError(f"cache_dir {cache_dir} is a file, not a folder; point cache_dir in the site YAML "
                               "at a folder on local disk (it is created if missing).")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir):
            pass
    except OSError as err:
        raise CacheFolderError(f"cache_dir {cache_dir} cannot be written ({err.strerror or err}); give the "
                               "user running fedvlp-site write access to it, or point cache_dir elsewhere.") from None


def run_ingest(site_cfg, progress: bool = True, workers: int | None = None) -> dict[str, Any]:
    """Ingest the site's export into its cache; returns the ingest report (also written to disk)."""
    started = time.time()
    cache_dir = Path(site_cfg.cache_dir)
    _check_cache_folder(cache_dir)
    # until the full report replaces it, the report says an ingest did not finish: a crash at any point
    # leaves that, and `fedvlp-site check` and training refuse the cache until an ingest completes
    write_atomic(cache_dir / INGEST_REPORT, json.dumps({"status": "running", "site_id": site_cfg.site_id,
                                                        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    model_cfg = site_cfg.model_config()
    pcfg = model_cfg.preprocess
    fingerprint = preprocess_fingerprint(pcfg)
    acct = Accounting()
    index = FileIndex(cache_dir)
    series: dict[str, dict[str, Any]] = {}  # series key -> job description

    nifti_paths = _collect_nifti(site_cfg, acct, series)
    if site_cfg.data.dicom_root:
        _collect_dicom(site_cfg, acct, index, series, nifti_paths, progress)

    reports, report_problems, report_rows = _read_reports(site_cfg, acct)
    studies = _join_reports(site_cfg, series, reports, acct)

    # the previous manifest only serves reuse: a damaged line's series is processed again
    previous = {row["series_key"]: row for row in read_manifest(cache_dir, skip_damaged=True) if "series_key" in row}
    jobs, reused = [], {}
    for key, job in series.items():
        job["fingerprint"] = hashlib.sha256((fingerprint + json.dumps(job["inputs"])).encode()).hexdigest()[:24]
        old = previous.get(key)
        if old and old.get("fingerprint") == job["fingerprint"] and volume_path(cache_dir, key).is_file():
            reused[key] = old
        else:
            jobs.append({**job, "series_key": key, "cache_dir": str(cache_dir), "preprocess": dataclasses.asdict(pcfg),
                         "min_slices": site_cfg.data.min_slices, "max_voxels": site_cfg.data.max_series_voxels})
    results = _run_jobs(jobs, workers if workers is not None else site_cfg.compute.workers, progress)

    labeler = build_labeler(site_cfg, model_cfg.vocabulary)
    findings_by_study: dict[str, dict[str, bool]] = {}
    manifest = []
    for key, job in sorted(series.items()):
        result = reused.get(key) or results.get(key)
        files = [entry[0] for entry in job["inputs"]]
        if result is None or "error" in result:
            reason, detail = (result or {}).get("error", (reasons.UNEXPECTED_ERROR, "no result"))
            for path in files:
                acct.refuse(path, reason, detail)
            continue
        study = studies[job["study_uid"]]
        text = study["report"].text if study["report"] else None
        if text is not None and job["study_uid"] not in findings_by_study:
            findings_by_study[job["study_uid"]] = labeler.label(report_body(text))
        row = {k: v for k, v in result.items() if k not in ("report", "findings", "report_location", "labeler")}
        row.update(
            series_key=key, fingerprint=job["fingerprint"], study_uid=job["study_uid"], series_uid=job["series_uid"],
            accession_number=job["accession_number"], patient_id=job["patient_id"], modality=job["modality"],
            series_description=job["series_description"], source=job["source"], files=len(files),
            report=text, report_location=study["report"].location if study["report"] else None,
            findings=findings_by_study.get(job["study_uid"]), labeler=labeler.name if text is not None else None,
        )
        manifest.append(row)
        for path in files:
            acct.ingested(path)

    report = acct.summary()
    report.update(
        status="complete",
        site_id=site_cfg.site_id,
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        duration_s=round(time.time() - started, 2),
        studies={"ingested": len({r["study_uid"] for r in manifest}),
                 "with_report": len({r["study_uid"] for r in manifest if r["report"] is not None})},
        series={"ingested": len(manifest), "reused": len(reused),
                "processed": sum(1 for r in results.values() if "error" not in r)},
        reports={"rows": report_rows, "joined": len({r["study_uid"] for r in manifest if r["report"] is not None}),
                 "problems": _count(p.reason for p in report_problems) | _count(r["reason"] for r in acct.report_rows
                                                                              if r["reason"] == reasons.REPORT_FOR_UNKNOWN_STUDY)},
        labeler=getattr(labeler, "stats", {}) | {"name": labeler.name},
        preprocess_fingerprint=fingerprint,
    )
    write_jsonl(cache_dir / MANIFEST, manifest)
    write_jsonl(cache_dir / QUARANTINE, acct.quarantine())
    index.save()
    _remove_stale_volumes(cache_dir, {row["series_key"] for row in manifest})
    write_atomic(cache_dir / INGEST_REPORT, json.dumps(report, indent=2, sort_keys=True))  # last: it completes
    return report


def unfinished_ingest(report: dict[str, Any]) -> str | None:
    """Why an ``ingest_report.json`` does not stand for a complete cache, or None when it does."""
    if report.get("status", "complete" if "finished_at" in report else None) == "complete":
        return None
    return (f"the last ingest (started {report.get('started_at', 'at an unknown time')}) did not finish, or is still "
            "running; run fedvlp-site ingest again and let it complete")


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for v in values:
        counts[v] += 1
    return dict(counts)


def _collect_nifti(site_cfg, acct: Accounting, series: dict) -> set[str]:
    """Series from the NIfTI manifest (one file each); returns the files it lists."""
    manifest = site_cfg.data.nifti_manifest
    if not manifest:
        return set()
    listed: set[str] = set()
    base = Path(manifest).parent
    with open(manifest, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        need = {"path", "study_id", "modality"}
        if not need <= set(reader.fieldnames or []):
            acct.refuse(manifest, reasons.NIFTI_MANIFEST_ROW, f"needs columns {sorted(need)}, has {reader.fieldnames}")
            return listed
        for number, row in enumerate(reader, start=2):
            where = f"{manifest}:{number}"
            path = str((base / (row.get("path") or "")).resolve()) if row.get("path") else ""
            modality = (row.get("modality") or "").strip().upper().replace("MRI", "MR")
            if not path or not row.get("study_id"):
                acct.refuse(where, reasons.NIFTI_MANIFEST_ROW, "empty path or study_id")
                continue
            listed.add(path)
            if not Path(path).is_file():
                acct.refuse(path, reasons.UNREADABLE_NIFTI, f"listed at {where} but not found")
                continue
            if modality not in ("CT", "MR"):
                acct.refuse(path, reasons.NIFTI_MANIFEST_ROW, f"{where}: modality {row.get('modality')!r} is not CT or MR")
                continue
            if modality not in site_cfg.data.modalities:
                acct.refuse(path, reasons.MODALITY_NOT_SELECTED, modality)
                continue
            st = os.stat(path)
            study_uid = row["study_id"].strip()
            series_uid = (row.get("series_id") or "").strip() or Path(path).name
            series[series_key(study_uid, series_uid)] = {
                "source": "nifti", "inputs": [[path, st.st_size, st.st_mtime_ns]], "headers": None,
                "study_uid": study_uid, "series_uid": series_uid, "modality": modality,
                "accession_number": (row.get("accession_number") or "").strip(), "patient_id": "",
                "series_description": Path(path).name,
            }
    return listed


def _collect_dicom(site_cfg, acct: Accounting, index: FileIndex, series: dict, skip: set[str], progress: bool) -> None:
    from tqdm import tqdm

    from .dicom import read_header

    headers = []
    walk = walk_export(site_cfg.data.dicom_root, exclude=site_cfg.cache_dir)
    for path, problem in tqdm(walk, desc="scan", unit=" files", disable=not progress):
        if path in skip:
            continue
        if problem:
            acct.refuse(path, *problem)
            continue
        try:
            st = os.stat(path)
            entry = index.lookup(path, st.st_size, st.st_mtime_ns)
            if entry is None:
                try:
                    header = dataclasses.asdict(read_header(path))
                    index.record(path, st.st_size, st.st_mtime_ns, header)
                except IngestError as err:
                    index.record(path, st.st_size, st.st_mtime_ns, None, err.reason, err.detail)
                entry = index.fresh[path]
            if entry["header"] is None:
                acct.refuse(path, entry["reason"], entry["detail"])
            else:
                headers.append(entry["header"])
        except Exception as err:  # noqa: BLE001 - one bad file never stops the ingest
            acct.refuse(path, reasons.UNEXPECTED_ERROR, f"{type(err).__name__}: {err}")
    by_series: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for header in headers:
        modality = header["modality"].upper()
        if modality not in site_cfg.data.modalities:
            acct.refuse(header["path"], reasons.MODALITY_NOT_SELECTED, modality or "no Modality")
            continue
        by_series[(header["study_uid"], header["series_uid"])].append(header)
    for (study_uid, series_uid), members in by_series.items():
        unique: dict[str, dict] = {}
        kept = []
        for header in sorted(members, key=lambda h: h["path"]):
            uid = header["sop_uid"]
            if uid and uid in unique:
                acct.refuse(header["path"], reasons.DUPLICATE_FILE, f"same SOPInstanceUID as {unique[uid]['path']}")
                continue
            if uid:  # without a SOPInstanceUID (an invalid export) an image is told apart by its position
                unique[uid] = header
            kept.append(header)
        first = kept[0]
        series[series_key(study_uid, series_uid)] = {
            "source": "dicom", "inputs": [[h["path"], h["size"], h["mtime_ns"]] for h in kept], "headers": kept,
            "study_uid": study_uid, "series_uid": series_uid, "modality": first["modality"].upper(),
            "accession_number": first["accession_number"], "patient_id": first["patient_id"],
            "series_description": first["series_description"],
        }


def _read_reports(site_cfg, acct: Accounting):
    cfg = site_cfg.data.reports
    if cfg is None:
        return {}, [], 0
    try:
        reports, problems, rows = read_report_export(cfg)
    except IngestError as err:
        acct.refuse(cfg.path, err.reason, err.detail)
        log.error("report export unusable: %s", err)
        return {}, [], 0
    for p in problems:
        acct.report_rows.append({"input": p.location, "reason": p.reason, "detail": p.detail})
    return reports, problems, rows


def _join_reports(site_cfg, series: dict, reports: dict, acct: Accounting) -> dict[str, dict]:
    """Studies with their report; drops the series of report-less studies when reports are required."""
    by_key = site_cfg.data.reports.key if site_cfg.data.reports else "accession_number"
    studies: dict[str, dict] = {}
    for job in series.values():
        key = job["accession_number"] if by_key == "accession_number" else job["study_uid"]
        studies.setdefault(job["study_uid"], {"key": key, "report": reports.get(key) if key else None})
    if site_cfg.data.require_report:
        for key in [k for k, job in series.items() if studies[job["study_uid"]]["report"] is None]:
            job = series.pop(key)
            field = "AccessionNumber" if by_key == "accession_number" else "StudyInstanceUID"
            for path, *_ in job["inputs"]:
                acct.refuse(path, reasons.NO_MATCHING_REPORT, f"{field} {studies[job['study_uid']]['key'] or '(empty)'}")
    known = {s["key"] for s in studies.values()}
    for key, report in reports.items():
        if key not in known:
            acct.report_rows.append({"input": report.location, "reason": reasons.REPORT_FOR_UNKNOWN_STUDY, "detail": key})
    return studies


def _run_jobs(jobs: list[dict], workers: int, progress: bool) -> dict[str, dict]:
    from tqdm import tqdm

    results: dict[str, dict] = {}
    if not jobs:
        return results
    bar = tqdm(total=len(jobs), desc="series", unit=" series", disable=not progress)
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            results[job["series_key"]] = process_series(job)
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")  # no fork after torch threads have started
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_one_thread) as pool:
            for job, result in zip(jobs, pool.map(process_series, jobs, chunksize=1)):
                results[job["series_key"]] = result
                bar.update()
    bar.close()
    return results


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # the pool's processes share the cores; each uses one


def _remove_stale_volumes(cache_dir: Path, keep: set[str]) -> None:
    folder = cache_dir / "volumes"
    if folder.is_dir():
        for path in folder.glob("*.npy"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)
