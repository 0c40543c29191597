"""Write a synthetic site export: a PACS-like DICOM tree, NIfTI files, a report export, masks and truth.

:func:`write_synthetic_export` draws studies from a :data:`shared_models.phantoms.SITE_PROFILES` profile
and writes, under ``out_dir``::

    dicom/...                      PACS dump: nested, dated, flat or per-series folders; random file names
    nifti/*.nii.gz                 the profile's NIfTI fraction, listed in nifti_manifest.csv
    nifti_manifest.csv             path,study_id,series_id,modality,accession_number (paths relative to out_dir)
    reports.csv | reports.jsonl    one report per study (neuro profile: JSONL)
    masks/<AccessionNumber>/{findings,organs}.nii.gz   label maps on the primary series' grid
    truth.json                     what was written and what an ingest must recover (below)

DICOM series come in every layout an ingest must handle: slices written in random order with
InstanceNumbers ascending or descending in z or shuffled, row/column directions flipped (still axial),
signed or unsigned pixels with RescaleIntercept 0 or -1024 and RescaleSlope 1 or 0.5, enhanced
multi-frame files (shared and per-frame functional groups), localizers, a DICOMDIR and non-DICOM files.

Geometry: a phantom array has axes (S, A, R); its voxel (s, a, r) lies at RAS world
``origin + (r * dr, a * da, s * ds)`` (truth's ``affine_sar``); DICOM positions are LPS (x and y negated).
Masks and NIfTI series store the array as (R, A, S) (or (L, A, S): x reversed, for some NIfTI series)
with the matching nibabel affine.

truth.json: ``{format_version, profile, seed, studies_requested, mask_labels, organ_labels: {CT, MR},
reports, nifti_manifest, dicom_files, non_image_files: [{path, kind: non-dicom|dicomdir}], studies}``; a
study: ``{accession_number, study_uid, patient_id, profile, modality, study_date, scanner, folder_style,
findings: {name: planted}, details, report: {style, date, mentions, text}, masks: {findings, organs},
series}``; a series: ``{series_uid, number, description, kind: primary|extra|localizer, format:
dicom|dicom-multiframe|nifti, sequence, num_slices, shape_sar, spacing_sar, thickness_mm, affine_sar,
z_first_mm, z_last_mm (world z of slices s = 0 and S - 1), instance_order: ascending|descending|shuffled,
instance_numbers (by s), orientation_variant, slice_normal_lps, functional_groups, rescale: {encoding,
pixel_representation, intercept, slope}, image_type, probes: [{index_sar, value}] (value after rescale),
files (paths relative to out_dir; DICOM by s), folder | nifti_layout}`` (localizers: fewer keys).
Report ``mentions`` are exactly what :func:`shared_models.reports.extract_findings` reads in its text.

The DICOM files themselves are written by :mod:`client.synth_dicom`.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
import zlib
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np

from shared_models.phantom_reports import compose_report
from shared_models.phantoms import (
    BRAIN_ORGANS, CHEST_ORGANS, MASK_LABELS, Phantom, get_profile, make_phantom, sample_modality, sample_study,
    scan_geometry,
)

from .synth_dicom import (
    _ORIENTATIONS, ENCODINGS, MEDIA_DIRECTORY, SOP_CLASSES, _encode, _hex, _paths, _uid, _write_classic, _write_extras,
    _write_localizer, _write_multiframe,
)

__all__ = ["SynthSummary", "write_synthetic_export", "affine_sar", "SOP_CLASSES", "MEDIA_DIRECTORY", "ENCODINGS"]

_MR_DESC = {"T1": "AX T1 SE", "T2": "AX T2 TSE", "FLAIR": "AX T2 FLAIR"}


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`write_synthetic_export` wrote (paths absolute)."""

    out_dir: Path
    profile: str
    studies: int
    patients: int
    series: int
    dicom_files: int
    nifti_files: int
    non_image_files: int
    reports_path: Path
    truth_path: Path
    seconds: float


def affine_sar(shape: tuple[int, ...], spacing: tuple[float, ...], center: tuple[float, float, float]) -> np.ndarray:
    """4x4 matrix from a voxel index (s, a, r, 1) to RAS world mm (x, y, z, 1); ``center`` (RAS) is the
    array centre's position."""
    m = np.zeros((4, 4))
    m[2, 0], m[1, 1], m[0, 2], m[3, 3] = spacing[0], spacing[1], spacing[2], 1.0
    m[:3, 3] = np.asarray(center) - m[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return m


def _nifti(array_sar: np.ndarray, aff_sar: np.ndarray, path: Path, flip_x: bool = False) -> None:
    """Write an (S, A, R) array as (R, A, S) (or (L, A, S) with ``flip_x``) with the matching affine."""
    data, aff = np.ascontiguousarray(array_sar.transpose(2, 1, 0)), aff_sar[:, [2, 1, 0, 3]].copy()
    if flip_x:
        data = np.ascontiguousarray(data[::-1])
        aff[:3, 3] += aff[:3, 0] * (data.shape[0] - 1)
        aff[:3, 0] *= -1
    img = nib.Nifti1Image(data, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _plan_patients(studies: int, probs: tuple[float, ...], rng: np.random.Generator) -> list[tuple[int, int]]:
    """(patient index, visit index) per study, visits drawn from ``studies_per_patient``."""
    out: list[tuple[int, int]] = []
    p = np.asarray(probs, float)
    while len(out) < studies:
        patient = out[-1][0] + 1 if out else 0
        out += [(patient, v) for v in range(int(rng.choice(len(p), p=p / p.sum())) + 1)]
    return out[:studies]


def _probes(decoded: np.ndarray, organs: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """Voxels (S, A, R) with their stored value after rescale: one per organ hit by 400 random draws, plus 4."""
    draws = [tuple(int(v) for v in rng.integers(0, decoded.shape, 3)) for _ in range(404)]
    first = {int(organs[p]): p for p in reversed(draws[:400])}
    points = [first[k] for k in sorted(first)] + draws[400:]
    return [{"index_sar": list(p), "value": float(decoded[p])} for p in points]


def _context(prof, seed: int, key: int, tag: str, i: int, patient: int, visit: int, srng: np.random.Generator) -> dict:
    """The study-level draws and identifiers of study ``i`` (patient, scanner, dates, UIDs, folder style)."""
    modality = sample_modality(prof, srng)
    scanner = prof.scanners[modality][int(srng.integers(len(prof.scanners[modality])))]
    day = date(2018, 1, 1) + timedelta(days=int(srng.integers(0, 2000)))
    person = zlib.crc32(f"{tag}{patient}".encode())
    return {"index": i, "patient": patient, "visit": visit, "modality": modality, "scanner": scanner, "day": day,
            "findings": sample_study(prof, srng, modality), "geometry": scan_geometry(scanner, srng),
            "anatomy_seed": int(srng.integers(0, 2**63 - 1)),
            "format": "nifti" if srng.random() < prof.nifti_fraction else (
                "dicom-multiframe" if srng.random() < prof.multiframe_fraction else "dicom"),
            "center": (float(srng.uniform(-10, 10)), float(srng.uniform(-15, 15)),
                       float(srng.uniform(-250, -100) if modality == "CT" else srng.uniform(-20, 40))),
            "accession": f"{tag}{i + 1:05d}", "study_uid": _uid(seed, prof.name, i, "study"),
            "frame_uid": _uid(seed, prof.name, i, "frame"), "date": day.strftime("%Y%m%d"),
            "time": f"{int(srng.integers(7, 19)):02d}{int(srng.integers(0, 60)):02d}00",
            "patient_id": f"SYN-{tag}-{patient + 1:04d}", "patient_name": f"Synthetic^P{tag}{patient + 1:04d}",
            "birth_date": f"{1940 + person % 50}0101", "sex": "MF"[person % 2],
            "study_description": "CT CHEST" if modality == "CT" else "MRI BRAIN WO",
            "folder_style": str(srng.choice(prof.folder_styles))}


def _plans(prof, ctx: dict, srng: np.random.Generator) -> list[tuple]:
    """(kind, sequence, shape, spacing, thickness, description) per series: a CT primary (+ a thicker second
    reconstruction), or one co-registered MR series per sequence (FLAIR primary)."""
    shape, spacing, thickness = ctx["geometry"]
    if ctx["modality"] == "MR":
        primary = "FLAIR" if "FLAIR" in prof.mr_sequences else prof.mr_sequences[0]
        return [("primary" if q == primary else "extra", q, shape, spacing, thickness, _MR_DESC[q])
                for q in prof.mr_sequences]
    plans = [("primary", None, shape, spacing, thickness, f"Thorax {thickness:g}mm {ctx['scanner'].kernel}")]
    if srng.random() < prof.extra_series_p:
        dz = 5.0 if spacing[0] < 4 else 2 * spacing[0]
        n = max(8, int(round(shape[0] * spacing[0] / dz)))
        plans.append(("extra", None, (n, *shape[1:]), (dz, *spacing[1:]), dz, f"Thorax {dz:g}mm soft tissue"))
    return plans


def _series(out: Path, ctx: dict, j: int, plan: tuple, seed: int, srng: np.random.Generator) -> tuple[dict, Phantom]:
    """Render one series' phantom and write it (DICOM, multi-frame DICOM or NIfTI); returns its truth entry."""
    kind, seq, shape, spacing, thickness, desc = plan
    modality, fmt = ctx["modality"], ctx["format"]
    ph = make_phantom(modality, ctx["findings"], np.random.default_rng(ctx["anatomy_seed"]), shape, spacing,
                      ctx["scanner"], seq or "T1")
    if modality == "CT":
        encoding = str(srng.choice(list(ENCODINGS)))
        stored, decoded = _encode(ph.volume, encoding)
    else:
        encoding, stored, decoded = "unsigned-mr", ph.volume, ph.volume
    rep, intercept, slope = ENCODINGS.get(encoding, (0, 0.0, 1.0))
    aff = affine_sar(shape, spacing, ctx["center"])
    order = str(srng.choice(["ascending", "descending", "shuffled"], p=[0.35, 0.45, 0.2]))
    numbers = {"ascending": np.arange(1, shape[0] + 1), "descending": np.arange(shape[0], 0, -1)}.get(
        order, srng.permutation(shape[0]) + 1)
    variant = str(srng.choice(list(_ORIENTATIONS), p=[0.7, 0.15, 0.15]))
    entry = {"series_uid": _uid(seed, ctx["study_uid"], "series", j), "number": 2 + j, "description": desc,
             "kind": kind, "format": fmt, "sequence": seq, "num_slices": shape[0], "shape_sar": list(shape),
             "spacing_sar": list(spacing), "thickness_mm": thickness, "affine_sar": aff.round(4).tolist(),
             "z_first_mm": round(float(aff[2, 3]), 4),
             "z_last_mm": round(float(aff[2, 3] + aff[2, 0] * (shape[0] - 1)), 4),
             "instance_order": order, "instance_numbers": [int(v) for v in numbers], "orientation_variant": variant,
             "slice_normal_lps": [0.0, 0.0, float(np.prod(_ORIENTATIONS[variant]))],
             "functional_groups": str(srng.choice(["shared", "per-frame"])) if fmt == "dicom-multiframe" else None,
             "rescale": {"encoding": encoding, "pixel_representation": rep, "intercept": intercept, "slope": slope},
             "image_type": ["ORIGINAL", "PRIMARY", "AXIAL"] + (["NONE"] if fmt == "dicom-multiframe" else []),
             "probes": _probes(decoded, ph.organs, srng)}
    if fmt == "nifti":
        flip = bool(srng.random() < 0.4)
        rel = f"nifti/{ctx['patient_id']}_{ctx['visit'] + 1}_{desc.replace(' ', '_')}.nii.gz"
        _nifti(decoded.astype(np.int16) if modality == "CT" else decoded, aff, out / rel, flip_x=flip)
        entry.update(files=[rel], nifti_layout="LAS" if flip else "RAS", instance_order=None, instance_numbers=None,
                     orientation_variant=None, slice_normal_lps=None, image_type=None)
        return entry, ph
    root = out / "dicom"
    rels = _paths(ctx["folder_style"], ctx, entry, shape[0], srng)
    if fmt == "dicom":
        written = _write_classic(ctx, entry, stored, root, [root / r for r in rels], srng)
        entry["files"] = ["dicom/" + p for p in written]
    else:
        _write_multiframe(ctx, entry, stored, root / rels[0])
        entry["files"] = ["dicom/" + rels[0].as_posix()]
    entry["folder"] = rels[0].parent.as_posix()
    return entry, ph


def _write_table(path: Path, header: list[str], rows: list) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")                       # quotes multi-line fields
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def write_synthetic_export(out_dir: str | Path, profile: str, studies: int, seed: int) -> SynthSummary:
    """Write ``studies`` synthetic studies of site ``profile`` into the new or empty folder ``out_dir``
    (layout in the module docstring).

    Deterministic: the same (profile, studies, seed) gives byte-identical files. Different profiles or
    seeds give different UIDs and accession numbers, so several exports can be pooled.

    Raises:
        ValueError: unknown profile, ``studies`` < 1, or ``out_dir`` exists and is not an empty folder.
    """
    t0 = time.perf_counter()
    prof = get_profile(profile)
    if int(studies) < 1:
        raise ValueError(f"studies must be >= 1, got {studies}.")
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; write a synthetic export into a new folder.")
    key = zlib.crc32(prof.name.encode())
    rng = np.random.default_rng([seed, key])
    tag = f"{prof.name[:3].upper()}{seed % 10000:04d}"
    junk = _write_extras(out, prof, tag, seed)
    truth, reports, manifest = [], [], []
    for i, (patient, visit) in enumerate(_plan_patients(int(studies), prof.studies_per_patient, rng)):
        srng = np.random.default_rng([seed, key, i])
        ctx = _context(prof, seed, key, tag, i, patient, visit, srng)
        series, phantoms = [], []
        for j, plan in enumerate(_plans(prof, ctx, srng)):
            entry, ph = _series(out, ctx, j, plan, seed, srng)
            series.append(entry)
            phantoms.append(ph)
            if ctx["format"] == "nifti":
                manifest.append([entry["files"][0], ctx["study_uid"], entry["series_uid"], ctx["modality"],
                                 ctx["accession"]])
        k = next(n for n, s in enumerate(series) if s["kind"] == "primary")
        primary, ph, aff = series[k], phantoms[k], np.asarray(series[k]["affine_sar"])
        if ctx["format"] != "nifti" and srng.random() < prof.localizer_p:
            loc = {"series_uid": _uid(seed, ctx["study_uid"], "localizer"), "number": 1, "description": "Localizer",
                   "kind": "localizer", "format": "dicom", "sequence": None, "num_slices": int(srng.integers(1, 4)),
                   "spacing_sar": list(ph.spacing), "image_type": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
                   "rescale": {"encoding": "signed", "pixel_representation": 1, "intercept": 0.0, "slope": 1.0}}
            folder = out / "dicom" / Path(primary["folder"]).parent / f"SE1_{_hex(loc['series_uid'], n=6)}"
            written = _write_localizer(ctx, loc, ph.volume.astype(np.float32), aff, out / "dicom", folder)
            loc["files"] = ["dicom/" + p for p in written]
            series.append(loc)
        name = str(srng.choice([".DS_Store", "preview.jpg", "Thumbs.db"]))
        if ctx["format"] != "nifti" and srng.random() < 0.3 and not (out / "dicom" / primary["folder"] / name).exists():
            path = out / "dicom" / primary["folder"] / name                  # a stray non-DICOM file
            path.write_bytes(b"not really a JPEG\n" if name.endswith(".jpg") else b"\x00\x00\x00\x01Bud1" + bytes(64))
            junk.append({"path": path.relative_to(out).as_posix(), "kind": "non-dicom"})
        _nifti(ph.findings_mask, aff, out / "masks" / ctx["accession"] / "findings.nii.gz")
        _nifti(ph.organs, aff, out / "masks" / ctx["accession"] / "organs.nii.gz")
        weights = np.array(list(prof.report_styles.values()), float)
        style = str(srng.choice(list(prof.report_styles), p=weights / weights.sum()))
        report = compose_report(ctx["findings"], np.random.default_rng([seed, key, i, 7]), style, ph.details)
        report_date = (ctx["day"] + timedelta(days=int(srng.integers(0, 4)))).strftime("%Y-%m-%d")
        reports.append((ctx["accession"], ctx["study_uid"], report.text, report_date))
        truth.append({"accession_number": ctx["accession"], "study_uid": ctx["study_uid"],
                      "patient_id": ctx["patient_id"], "profile": prof.name, "modality": ctx["modality"],
                      "study_date": ctx["date"], "scanner": ctx["scanner"].name,
                      "folder_style": ctx["folder_style"] if ctx["format"] != "nifti" else None,
                      "findings": ctx["findings"], "details": ph.details,
                      "report": {"style": style, "date": report_date, "mentions": report.mentions, "text": report.text},
                      "masks": {"findings": f"masks/{ctx['accession']}/findings.nii.gz",
                                "organs": f"masks/{ctx['accession']}/organs.nii.gz"}, "series": series})
    order = rng.permutation(len(reports))                                  # a RIS export is not in PACS order
    if prof.report_format == "jsonl":
        reports_path = out / "reports.jsonl"
        reports_path.write_text("".join(json.dumps({"accession_number": reports[k][0], "study_uid": reports[k][1],
                                                    "text": reports[k][2]}) + "\n" for k in order), encoding="utf-8")
    else:
        reports_path = out / "reports.csv"
        _write_table(reports_path, ["AccessionNumber", "StudyInstanceUID", "ReportText", "ReportDate"],
                     [reports[k] for k in order])
    _write_table(out / "nifti_manifest.csv", ["path", "study_id", "series_id", "modality", "accession_number"],
                 manifest)
    all_series = [s for t in truth for s in t["series"]]
    n_dicom = sum(len(s["files"]) for s in all_series if s["format"] != "nifti")
    doc = {"format_version": 1, "profile": prof.name, "seed": int(seed), "studies_requested": int(studies),
           "mask_labels": list(MASK_LABELS), "organ_labels": {"CT": CHEST_ORGANS, "MR": BRAIN_ORGANS},
           "reports": reports_path.name, "nifti_manifest": "nifti_manifest.csv", "dicom_files": n_dicom,
           "non_image_files": junk, "studies": truth}
    text = re.sub(r"\[\s+([-\d.,\s]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                  json.dumps(doc, indent=1))
    truth_path = out / "truth.json"
    truth_path.write_text(text, encoding="utf-8")                         # number lists kept on one line
    return SynthSummary(out, prof.name, len(truth), len({t["patient_id"] for t in truth}), len(all_series), n_dicom,
                        len(manifest), len(junk), reports_path, truth_path, round(time.perf_counter() - t0, 3))
