"""Ingest: each kind of bad input ends as a named reason while the rest of the export is ingested."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from client.cli import main as site_cli
from client.ingest import reasons
from client.ingest.cache import load_volume, read_jsonl, read_manifest
from client.ingest.pipeline import run_ingest
from client.site_config import load_site_config

GOOD_REPORTS = {
    "ACC1": "FINDINGS: Small right pleural effusion. No nodules. IMPRESSION: Effusion.",
    "ACC2": "FINDINGS: The heart is enlarged. No effusion. IMPRESSION: Cardiomegaly.",
}


def write_reports(root: Path, extra: list[tuple[str, str]] = (), raw_tail: bytes = b"") -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["AccessionNumber", "ReportText"])
    for acc, text in list(GOOD_REPORTS.items()) + list(extra):
        writer.writerow([acc, text])
    (root / "reports.csv").write_bytes(buffer.getvalue().encode() + raw_tail)


@pytest.fixture
def export(tmp_path, ct_series_writer):
    ct_series_writer(tmp_path / "dicom" / "PAT1" / "S1", "1.2.3.1", "1.2.3.1.1", "ACC1", seed=1)
    ct_series_writer(tmp_path / "dicom" / "deep" / "er" / "x", "1.2.3.2", "1.2.3.2.1", "ACC2", seed=2)
    write_reports(tmp_path)
    return tmp_path


def bare_dicom(path: Path, with_pixels: bool = False, transfer_syntax=ExplicitVRLittleEndian) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, "9.9.9.1"
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "9.9.9.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.AccessionNumber = "9.9", "9.9.9", "CT", "ACC9"
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 16, 15, 1, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if with_pixels:
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\x00" * 32])
        ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


CASES = {}


def case(name):
    """Register a bad-input case: it damages the export and returns (where the refusal shows, reason)."""
    def register(fn):
        CASES[name] = fn
        return fn
    return register


@case("truncated file")
def _(root, write):
    paths = write(root / "dicom" / "t", "1.2.3.7", "1.2.3.7.1", "ACC7", slices=8)
    paths[0].write_bytes(paths[0].read_bytes()[:300])
    return paths[0].name, reasons.UNREADABLE_DICOM


@case("text file named .dcm")
def _(root, write):
    (root / "dicom" / "notes.dcm").write_text("hello")
    return "notes.dcm", reasons.NOT_DICOM


@case("DICOM without pixels")
def _(root, write):
    bare_dicom(root / "dicom" / "nopix" / "IM1")
    return "nopix", reasons.NO_PIXEL_DATA


@case("compressed pixels without a decoder")
def _(root, write):
    from pydicom.pixels import get_decoder
    from pydicom.uid import HTJ2KLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless

    # Pillow (a dependency) decodes JPEG 2000 and baseline JPEG; these need plugins the project lacks
    syntax = next(u for u in (JPEGLSLossless, JPEGLSNearLossless, JPEGLosslessSV1, HTJ2KLossless)
                  if not get_decoder(u).is_available)
    bare_dicom(root / "dicom" / "jls" / "IM1", True, syntax)
    return "jls", reasons.UNSUPPORTED_TRANSFER_SYNTAX


@case("mixed sizes in a series")
def _(root, write):
    write(root / "dicom" / "mixed", "1.2.3.3", "1.2.3.3.1", "ACC1", slices=10, rows_per_slice=[32] * 9 + [16])
    return "mixed", reasons.INCONSISTENT_GEOMETRY


@case("duplicate slices")
def _(root, write):
    write(root / "dicom" / "dup", "1.2.3.4", "1.2.3.4.1", "ACC1", z_positions=[0, 2.5, 5, 5, 7.5, 10, 12.5, 15, 17.5, 20])
    return "dup", reasons.DUPLICATE_SLICES


@case("a gap in a series")
def _(root, write):
    write(root / "dicom" / "gap", "1.2.3.5", "1.2.3.5.1", "ACC1", z_positions=[0, 2.5, 5, 7.5, 10, 20, 22.5, 25, 27.5, 30])
    return "gap", reasons.MISSING_SLICES


@case("zero spacing")
def _(root, write):
    write(root / "dicom" / "zero", "1.2.3.6", "1.2.3.6.1", "ACC1", slices=10, pixel_spacing=(0.0, 0.0))
    return "zero", reasons.BAD_SPACING


@case("NaN spacing")
def _(root, write):
    write(root / "dicom" / "nan", "1.2.3.8", "1.2.3.8.1", "ACC1", slices=10, pixel_spacing=(float("nan"),) * 2)
    return "nan", reasons.BAD_SPACING


@case("series too small")
def _(root, write):
    write(root / "dicom" / "small", "1.2.3.9", "1.2.3.9.1", "ACC1", slices=4)
    return "small", reasons.SERIES_TOO_SMALL


@case("localizer")
def _(root, write):
    write(root / "dicom" / "scout", "1.2.3.10", "1.2.3.10.1", "ACC1", slices=2, image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    return "scout", reasons.NOT_AN_IMAGE_SERIES


@case("modality not selected")
def _(root, write):
    write(root / "dicom" / "mr", "1.2.3.11", "1.2.3.11.1", "ACC1", slices=10, modality="MR")
    return "mr", reasons.MODALITY_NOT_SELECTED


@case("duplicate file")
def _(root, write):
    shutil.copy(sorted((root / "dicom" / "PAT1" / "S1").iterdir())[0], root / "dicom" / "copy_of_slice")
    return "copy_of_slice", reasons.DUPLICATE_FILE


@case("study without a report")
def _(root, write):
    write(root / "dicom" / "norep", "1.2.3.12", "1.2.3.12.1", "ACC-NONE", slices=10)
    return "norep", reasons.NO_MATCHING_REPORT


@case("link escaping the export root")
def _(root, write):
    (root / "outside.txt").write_text("secret")
    os.symlink(root / "outside.txt", root / "dicom" / "escape")
    return "escape", reasons.OUTSIDE_EXPORT_ROOT


@case("non-UTF-8 report row")
def _(root, write):
    write_reports(root, raw_tail=b'ACC5,"Pl\xe9ural effusion"\n')
    return "reports.csv:4", reasons.UNREADABLE_REPORT_ROW


@case("empty report")
def _(root, write):
    write_reports(root, [("ACC6", "   ")])
    return "reports.csv:4", reasons.EMPTY_REPORT


@case("report for an unknown study")
def _(root, write):
    write_reports(root, [("ACC404", "No effusion.")])
    return "reports.csv:4", reasons.REPORT_FOR_UNKNOWN_STUDY


@case("unreadable NIfTI")
def _(root, write):
    (root / "broken.nii.gz").write_bytes(gzip.compress(b"not a nifti header"))
    (root / "nifti.csv").write_text("path,study_id,series_id,modality,accession_number\nbroken.nii.gz,N1,N1.1,CT,ACC1\n")
    return "broken.nii.gz", reasons.UNREADABLE_NIFTI


def _rewrite(paths, **tags) -> None:
    """Set DICOM attributes of written files in place (``None`` deletes one)."""
    import pydicom

    for path in paths:
        ds = pydicom.dcmread(path)
        for name, value in tags.items():
            if value is None:
                delattr(ds, name)
            else:
                setattr(ds, name, value)
        ds.save_as(path)


@case("header claims a huge image")
def _(root, write):
    paths = write(root / "dicom" / "huge", "1.2.3.13", "1.2.3.13.1", "ACC1", slices=10)
    _rewrite(paths, Rows=65535, Columns=65535, PixelData=bytes(128))
    return "huge", reasons.UNREADABLE_PIXELS, "more than its"  # refused from the header, nothing allocated


@case("NaN rescale slope")
def _(root, write):
    import pydicom

    paths = write(root / "dicom" / "nanslope", "1.2.3.14", "1.2.3.14.1", "ACC1", slices=10)
    for path in paths:  # pydicom refuses to write a NaN DS; the raw element is what a damaged export holds
        ds = pydicom.dcmread(path)
        ds["RescaleSlope"] = pydicom.DataElement(0x00281053, "DS", "NaN", validation_mode=0)
        ds.save_as(path)
    return "nanslope", reasons.NON_FINITE_PIXELS


@case("series over the voxel limit")
def _(root, write):
    write(root / "dicom" / "big", "1.2.3.15", "1.2.3.15.1", "ACC1", slices=40)
    return "big", reasons.SERIES_TOO_LARGE


@case("a file name that is not valid UTF-8")
def _(root, write):
    fd = os.open(os.fsencode(root / "dicom") + b"/caf\xe9-notes.txt", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"not a DICOM file")
    os.close(fd)
    return "caf\udce9-notes.txt", reasons.NOT_DICOM


@case("NIfTI with a failed gzip checksum")
def _(root, write):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((32, 32, 20), np.int16), np.diag([1.5, 1.5, 2.5, 1.0])), root / "crc.nii.gz")
    raw = bytearray((root / "crc.nii.gz").read_bytes())
    raw[-8] ^= 0xFF  # the CRC-32 of the trailer: the data still inflates, to bytes the CRC disowns
    (root / "crc.nii.gz").write_bytes(bytes(raw))
    (root / "nifti.csv").write_text("path,study_id,series_id,modality,accession_number\ncrc.nii.gz,N2,N2.1,CT,ACC1\n")
    return "crc.nii.gz", reasons.UNREADABLE_NIFTI, "gzip"


@case("NIfTI over the voxel limit")
def _(root, write):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((32, 32, 40), np.int16), np.diag([1.5, 1.5, 2.5, 1.0])), root / "big.nii.gz")
    (root / "nifti.csv").write_text("path,study_id,series_id,modality,accession_number\nbig.nii.gz,N3,N3.1,CT,ACC1\n")
    return "big.nii.gz", reasons.SERIES_TOO_LARGE


@case("report CSV with missing columns")
def _(root, write):
    (root / "reports.csv").write_text("Acc,Text\nACC1,x\n")
    return "reports.csv", reasons.REPORT_FILE_UNUSABLE


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_named_and_the_rest_is_ingested(name, export, ct_series_writer, site_yaml_writer):
    where, reason, *detail = CASES[name](export, ct_series_writer)
    data: dict = {}
    if name in ("unreadable NIfTI", "NIfTI with a failed gzip checksum", "NIfTI over the voxel limit"):
        data.update({"nifti_manifest": str(export / "nifti.csv")})
    if name == "report CSV with missing columns":  # no report can be joined: keep the images for MAE
        data.update({"require_report": False})
    if name == "modality not selected":
        data.update({"modalities": ["CT"]})
    if name in ("series over the voxel limit", "NIfTI over the voxel limit"):  # good series: 20 slices of 32 x 32
        data.update({"max_series_voxels": 32 * 32 * 30})
    overrides = {"data": data} if data else {}
    cfg = load_site_config(site_yaml_writer(export, **overrides))
    report = run_ingest(cfg, progress=False)

    quarantine = read_jsonl(Path(cfg.cache_dir) / "quarantine.jsonl")
    hits = [q for q in quarantine if q["reason"] == reason and where in q["input"]
            and all(d in q.get("detail", "") for d in detail)]
    assert hits, (reason, where, quarantine)
    ingested = {row["accession_number"] for row in read_manifest(cfg.cache_dir)}
    assert {"ACC1", "ACC2"} <= ingested
    files = report["files"]
    assert files["seen"] == files["ingested"] + files["skipped"] + files["failed"]
    on_disk = {str(p) for p in (export / "dicom").rglob("*") if p.is_file() or p.is_symlink()}
    quarantined = {q["input"] for q in quarantine}
    assert files["ingested"] >= 40  # the 2 good series of 20 slices
    assert len(on_disk - quarantined) == files["ingested"]  # every file not quarantined was ingested


def test_images_without_sop_instance_uid_are_told_apart_by_position(export, ct_series_writer, site_yaml_writer):
    """An export that leaves out SOPInstanceUID (invalid, but seen) is not "duplicate instance" of itself."""
    paths = ct_series_writer(export / "dicom" / "nouid", "1.2.3.16", "1.2.3.16.1", "ACC3", slices=10)
    _rewrite(paths, SOPInstanceUID=None)
    write_reports(export, [("ACC3", "No pleural effusion.")])
    cfg = load_site_config(site_yaml_writer(export))
    report = run_ingest(cfg, progress=False)
    assert "ACC3" in {row["accession_number"] for row in read_manifest(cfg.cache_dir)}
    assert not [q for q in read_jsonl(Path(cfg.cache_dir) / "quarantine.jsonl") if "nouid" in q["input"]]
    assert report["files"]["ingested"] == 50


def test_report_text_findings_and_cache(export, site_yaml_writer):
    cfg = load_site_config(site_yaml_writer(export))
    run_ingest(cfg, progress=False)
    rows = {row["accession_number"]: row for row in read_manifest(cfg.cache_dir)}
    assert rows["ACC1"]["findings"] == {"Pleural effusion": True, "Lung nodule": False}
    assert rows["ACC2"]["findings"] == {"Cardiomegaly": True, "Pleural effusion": False}
    assert rows["ACC1"]["num_slices"] == 20 and rows["ACC1"]["original_spacing"] == [2.5, 1.5, 1.5]
    volume = load_volume(cfg.cache_dir, rows["ACC1"]["cache_file"])
    assert volume.dtype == np.float16 and volume.shape == (64, 64, 64) and np.isfinite(volume).all()


def test_reingest_of_an_unchanged_export_reads_no_file_and_picks_up_new_studies(
        export, ct_series_writer, site_yaml_writer, monkeypatch):
    cfg = load_site_config(site_yaml_writer(export))
    first = run_ingest(cfg, progress=False)
    assert first["series"]["processed"] == 2

    import client.ingest.dicom as dicom

    def refuse(*args, **kwargs):
        raise AssertionError("an unchanged file was read again")

    monkeypatch.setattr(dicom, "read_header", refuse)
    monkeypatch.setattr(dicom, "load_series", refuse)
    second = run_ingest(cfg, progress=False)
    assert second["series"] == {"ingested": 2, "processed": 0, "reused": 2}
    monkeypatch.undo()

    ct_series_writer(export / "dicom" / "new", "1.2.3.20", "1.2.3.20.1", "ACC3", slices=10)
    write_reports(export, [("ACC3", "No pleural effusion.")])
    third = run_ingest(cfg, progress=False)
    assert third["series"] == {"ingested": 3, "processed": 1, "reused": 2}
    assert third["files"]["ingested"] == 50


def test_parallel_ingest_matches_serial(export, site_yaml_writer):
    serial = load_site_config(site_yaml_writer(export))
    run_ingest(serial, progress=False, workers=0)
    a = {r["series_key"]: np.asarray(load_volume(serial.cache_dir, r["cache_file"])) for r in read_manifest(serial.cache_dir)}
    shutil.rmtree(serial.cache_dir)
    run_ingest(serial, progress=False, workers=2)
    b = {r["series_key"]: np.asarray(load_volume(serial.cache_dir, r["cache_file"])) for r in read_manifest(serial.cache_dir)}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_cli_ingest_then_check(export, site_yaml_writer, capsys):
    path = site_yaml_writer(export)
    assert site_cli(["ingest", "--config", str(path), "--quiet"]) == 0
    assert "40 ingested" in capsys.readouterr().out
    assert site_cli(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 studies, 2 series (CT: 2)" in out and "Pleural effusion" in out and "OK" in out
    report = json.loads((export / "cache" / "ingest_report.json").read_text())
    assert report["files"]["ingested"] == 40
    first = read_manifest(export / "cache")[0]
    (export / "cache" / first["cache_file"]).unlink()
    assert site_cli(["check", "--config", str(path)]) == 1
    assert "re-run ingest" in capsys.readouterr().err


def test_a_folder_that_cannot_be_listed_is_counted_and_named(export, site_yaml_writer, monkeypatch):
    """A folder the walk cannot enter (no permission; tests may run as root, so listing it is refused
    here as the system would) is a failed input with its reason, not files that silently vanish."""
    (export / "dicom" / "locked").mkdir()
    (export / "dicom" / "locked" / "IM1").write_bytes(b"unseen")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    cfg = load_site_config(site_yaml_writer(export))
    report = run_ingest(cfg, progress=False)
    quarantine = read_jsonl(Path(cfg.cache_dir) / "quarantine.jsonl")
    hits = [q for q in quarantine if q["reason"] == reasons.UNREADABLE_FOLDER]
    assert len(hits) == 1 and hits[0]["input"].endswith("locked") and "read access" in hits[0]["detail"]
    files = report["files"]
    assert files["failed"] == 1 and files["seen"] == files["ingested"] + files["skipped"] + files["failed"]
    assert {"ACC1", "ACC2"} <= {row["accession_number"] for row in read_manifest(cfg.cache_dir)}


def test_an_ingest_that_crashes_midway_leaves_a_report_that_says_so(export, site_yaml_writer, capsys, monkeypatch):
    """A crash after the volumes were written (here: while the quarantine is written) leaves the report
    saying the ingest did not finish; check refuses the cache until an ingest completes."""
    import client.ingest.pipeline as pipeline

    path = site_yaml_writer(export)
    assert site_cli(["ingest", "--config", str(path), "--quiet"]) == 0
    real = pipeline.write_jsonl

    def crash(target, rows):
        if target.name == "quarantine.jsonl":
            raise KeyboardInterrupt  # the operator's Ctrl-C, or a kill, at the worst moment
        return real(target, rows)

    monkeypatch.setattr(pipeline, "write_jsonl", crash)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(load_site_config(path), progress=False)
    monkeypatch.undo()
    report = json.loads((export / "cache" / "ingest_report.json").read_text())
    assert report["status"] == "running"
    capsys.readouterr()
    assert site_cli(["check", "--config", str(path)]) == 1
    assert "did not finish" in capsys.readouterr().err
    assert site_cli(["ingest", "--config", str(path), "--quiet"]) == 0
    assert json.loads((export / "cache" / "ingest_report.json").read_text())["status"] == "complete"
    assert site_cli(["check", "--config", str(path)]) == 0


def test_a_damaged_manifest_line_is_named_by_check_and_repaired_by_ingest(export, site_yaml_writer, capsys):
    path = site_yaml_writer(export)
    assert site_cli(["ingest", "--config", str(path), "--quiet"]) == 0
    manifest = export / "cache" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2] + "\n")  # the second line cut
    capsys.readouterr()
    assert site_cli(["check", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "manifest.jsonl:2: damaged manifest line" in err and "fedvlp-site ingest" in err
    assert site_cli(["ingest", "--config", str(path), "--quiet"]) == 0  # reprocesses the damaged row's series
    assert len(read_manifest(export / "cache")) == 2
    assert site_cli(["check", "--config", str(path)]) == 0


def test_a_cache_folder_that_cannot_hold_a_cache_is_named_before_any_input_is_read(
        export, site_yaml_writer, capsys, monkeypatch):
    import client.ingest.pipeline as pipeline

    def no_walk(*args, **kwargs):
        raise AssertionError("inputs were read before the cache folder was checked")

    monkeypatch.setattr(pipeline, "_collect_dicom", no_walk)
    (export / "a-file").write_text("not a folder")
    path = site_yaml_writer(export, cache_dir=str(export / "a-file"))
    assert site_cli(["ingest", "--config", str(path), "--quiet"]) == 2
    assert "a-file is a file, not a folder" in capsys.readouterr().err
    def denied(*args, **kwargs):  # what a folder without write permission gives (tests may run as root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pipeline.tempfile, "TemporaryFile", denied)
    path = site_yaml_writer(export, cache_dir=str(export / "locked"))
    assert site_cli(["ingest", "--config", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "locked cannot be written (Permission denied)" in err and "write access" in err


def test_cli_configuration_error_exits_2(tmp_path, capsys):
    (tmp_path / "site.yaml").write_text("site_id: x\n")
    assert site_cli(["check", "--config", str(tmp_path / "site.yaml")]) == 2
    assert "cache_dir: is required" in capsys.readouterr().err


def test_randomly_damaged_copies_of_a_good_series_never_stop_an_ingest(export, site_yaml_writer):
    """Fuzz: truncated files, flipped header bytes and deleted tags, each a copy of a good slice in a series
    of its own. Ingest never raises or hangs, the good studies are ingested, every file is accounted for."""
    import random
    import signal

    import pydicom

    rng = random.Random(20261202)
    good = sorted((export / "dicom" / "PAT1" / "S1").iterdir())
    damaged = export / "dicom" / "damaged"
    damaged.mkdir()
    tags = ["Rows", "Columns", "PixelData", "StudyInstanceUID", "SeriesInstanceUID", "ImagePositionPatient",
            "PixelSpacing", "Modality", "BitsAllocated", "RescaleSlope", "SOPInstanceUID", "ImageOrientationPatient"]
    for i in range(24):
        raw = bytearray(rng.choice(good).read_bytes())
        kind = i % 3
        if kind == 0:  # truncated anywhere
            raw = raw[: rng.randrange(1, len(raw))]
        elif kind == 1:  # flipped bytes in the header (before the pixel data)
            for _ in range(rng.randint(1, 8)):
                raw[rng.randrange(128, min(len(raw), 900))] ^= 1 << rng.randrange(8)
        target = damaged / f"copy{i:02d}"
        target.write_bytes(bytes(raw))
        if kind == 2:  # deleted tags, a new series of its own
            ds = pydicom.dcmread(target)
            ds.SeriesInstanceUID = f"1.2.3.99.{i}"
            for name in rng.sample(tags, rng.randint(1, 3)):
                if name in ds:
                    delattr(ds, name)
            ds.save_as(target)

    def hung(*_):
        raise TimeoutError("ingest hangs on damaged input")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(300)
    try:
        cfg = load_site_config(site_yaml_writer(export))
        report = run_ingest(cfg, progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    files = report["files"]
    assert files["seen"] == files["ingested"] + files["skipped"] + files["failed"]
    assert {"ACC1", "ACC2"} <= {row["accession_number"] for row in read_manifest(cfg.cache_dir)}
    quarantined = {q["input"] for q in read_jsonl(Path(cfg.cache_dir) / "quarantine.jsonl")}
    on_disk = {str(p) for p in (export / "dicom").rglob("*") if p.is_file()}
    assert len(on_disk - quarantined) == files["ingested"]
    assert report["reasons"].get(reasons.UNEXPECTED_ERROR) is None, report["reasons"].get(reasons.UNEXPECTED_ERROR)
