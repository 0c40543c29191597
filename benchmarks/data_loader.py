"""Data-loader throughput from the site cache against a MONAI pipeline over NIfTI, and the data-wait fraction.

    .venv/bin/python benchmarks/data_loader.py                       # 24 studies, tiny preset (64^3), this CPU
    .venv/bin/python benchmarks/data_loader.py --size 128            # a 128^3 cache (2.5 mm, same field of view)
    .venv/bin/python benchmarks/data_loader.py --device cuda --studies 64 --workers 0 2 4 8 --size 192
    .venv/bin/python benchmarks/data_loader.py --cold --epochs 1     # files evicted from the page cache first

1. A cohort: a synthetic export (profile "general", CT only) of ``--studies`` studies, ingested with
   ``client.ingest.pipeline.run_ingest`` into a cache of the tiny preset (``--size N``: N^3 volumes at
   5 * 64 / N mm, i.e. the tiny preset's 320 mm field of view at a finer grid).
2. The baseline's input: the primary series of every cached study (the one ``SiteDataset`` lists first)
   read back from the export with the ingest's own readers (DICOM or NIfTI) and written with nibabel as
   int16 HU ``.nii.gz`` with its RAS affine, one file per study (``--nifti-zoom Z`` resamples the
   originals by Z per axis first, e.g. 4 for clinical 512^2 matrices; the synthetic ones are 96-144^2).
3. Loader throughput, each with every ``--workers`` count (pin_memory on CUDA; batches copied to the
   device and synchronised; ``--epochs`` epochs of ``--batch`` studies; the rate includes worker start):
   (a) ours: the stream ``run_steps`` draws from (``SiteDataset`` reading the memory-mapped float16
   cache, ``Collate`` adding OSL pairs and multi-view crops, a ``DataLoader`` with the training path's
   settings); (b) MONAI: ``monai.data.Dataset`` + ``monai.data.DataLoader`` with the same workers, batch,
   pinning and persistence, loading every NIfTI on every epoch: LoadImaged (nibabel), EnsureChannelFirstd,
   Orientationd("RAS"), Spacingd to the preset spacing, ScaleIntensityRanged HU window to the preset's
   normalised range, ResizeWithPadOrCropd to the preset size (MONAI defaults elsewhere, e.g. float64
   resampling). The baseline's output for one study is compared with the cached volume (max and mean
   abs difference, normalised units) so both paths are seen to make the same input.
4. The wait fraction: ``--train-steps`` real ``run_steps`` steps of the tiny model on the cache (preset
   objective weights, MAE alternating) with each worker count; prints its ``data-wait-fraction`` and
   ``volumes-per-second``. A 2-step run first warms the model up.
Everything lives in a temporary folder (``--keep`` keeps it). About 3 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

import shared_models as sm
from client.ingest.dicom import load_series, read_header
from client.ingest.nifti import load_nifti
from client.ingest.pipeline import run_ingest
from client.site_config import load_site_config
from client.synth import write_synthetic_export
from shared_models.cohort import SiteDataset, load_volume
from shared_models.training import StepSettings, _stream, cohort_dataset, make_optimizer, run_steps, to_device

TINY_FIELD_OF_VIEW_MM = 5.0 * 64  # the tiny preset: 64 voxels of 5 mm
# MONAI's LoadImage builds every reader, the GPU DICOM one included, which complains on machines without it
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")


# ---- the cohort ----------------------------------------------------------------------------------

def make_cohort(root: Path, studies: int, size: int | None, ingest_workers: int):
    """Synthesize and ingest a site; returns its site config (``model_config()`` is the cache's model)."""
    summary = write_synthetic_export(root / "export", "general", studies, seed=0)
    config = {"site_id": "bench", "cache_dir": str(root / "cache"), "model": "tiny",
              "data": {"dicom_root": str(root / "export" / "dicom"),
                       "nifti_manifest": str(root / "export" / "nifti_manifest.csv"),
                       "reports": {"path": str(root / "export" / "reports.csv")}},
              "compute": {"workers": ingest_workers}}
    if size is not None:
        spacing = round(TINY_FIELD_OF_VIEW_MM / size, 4)
        config["preprocess"] = {"size": [size] * 3, "spacing": [spacing] * 3}
    (root / "site.yaml").write_text(yaml.safe_dump(config))
    site = load_site_config(root / "site.yaml")
    report = run_ingest(site, progress=False)
    print(f"cohort: {summary.studies} studies, {summary.series} series ({summary.dicom_files} DICOM files, "
          f"{summary.nifti_files} NIfTI) written in {summary.seconds:.1f} s; ingested {report['series']['ingested']} "
          f"series of {report['studies']['with_report']} studies with a report in {report['duration_s']:.1f} s")
    return site


def original_volume(export: Path, series: dict) -> tuple[np.ndarray, np.ndarray]:
    """A series as exported (HU, voxel order) and its RAS affine, read with the ingest's readers."""
    files = [str(export / f) for f in series["files"]]
    if series["format"] == "nifti":
        array, affine, _ = load_nifti(files[0])
        return array, affine
    volume = load_series([read_header(f) for f in files])
    return volume.array, volume.affine


def zoomed(array: np.ndarray, affine: np.ndarray, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """``array`` resampled by ``zoom`` per axis (trilinear), with the affine of the finer grid."""
    if zoom == 1:
        return array, affine
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(t, scale_factor=zoom, mode="trilinear", align_corners=False)[0, 0].numpy()
    finer = affine.copy()
    finer[:3, :3] = affine[:3, :3] / zoom
    finer[:3, 3] = affine[:3, 3] + affine[:3, :3] @ np.full(3, (1 / zoom - 1) / 2)  # same field of view
    return out, finer


def write_nifti_copies(site, zoom: float) -> list[dict]:
    """One int16 HU ``.nii.gz`` per cached study (its primary series); MONAI data dicts, in dataset order."""
    export = Path(site.data.dicom_root).parent
    truth = json.loads((export / "truth.json").read_text())
    series_by_uid = {s["series_uid"]: s for study in truth["studies"] for s in study["series"]}
    folder = export.parent / "nifti_copies"
    folder.mkdir()
    items, started, voxels = [], time.perf_counter(), []
    for study in SiteDataset(site.cache_dir, site.model_config(), with_reports=True, augment=False).studies:
        row = study["series"][0]
        array, affine = zoomed(*original_volume(export, series_by_uid[row["series_uid"]]), zoom)
        image = nib.Nifti1Image(np.round(array).astype(np.int16), affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        path = folder / f"{len(items):04d}.nii.gz"
        nib.save(image, path)
        items.append({"image": str(path), "cache_file": row["cache_file"]})
        voxels.append(array.size)
    megabytes = sum(Path(i["image"]).stat().st_size for i in items) / 1e6
    seconds = time.perf_counter() - started
    print(f"NIfTI copies: {len(items)} studies (primary series, int16 .nii.gz, zoom {zoom:g}), median "
          f"{statistics.median(voxels) / 1e6:.2f} M voxels, {megabytes:.1f} MB, written in {seconds:.1f} s")
    return items


# ---- the two loaders -----------------------------------------------------------------------------

def monai_transform(cfg: sm.ModelConfig):
    """The usual per-epoch MONAI preprocessing, to the preset's grid and normalised intensities."""
    from monai.transforms import (
        Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ResizeWithPadOrCropd, ScaleIntensityRanged, Spacingd,
    )

    p = cfg.preprocess
    low, high = ((v - p.norm_mean) / p.norm_std for v in (0.0, 1.0))  # [0, 1] after the window, then normalised
    return Compose([
        LoadImaged(keys="image", reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys="image", pixdim=tuple(p.spacing[::-1]), mode="bilinear"),  # preset spacing is (S, A, R)
        ScaleIntensityRanged(keys="image", a_min=p.hu_window[0], a_max=p.hu_window[1], b_min=low, b_max=high,
                             clip=True),
        ResizeWithPadOrCropd(keys="image", spatial_size=tuple(p.size[::-1]), value=low),
    ])


def our_stream(site, cfg: sm.ModelConfig, s: StepSettings, device: torch.device) -> Iterator[dict]:
    """The endless vision-language batches run_steps trains on (its own stream, same settings)."""
    return _stream(cohort_dataset([site.cache_dir], cfg, True, s.seed), cfg, s, s.seed, device)


def monai_stream(items: list[dict], cfg: sm.ModelConfig, s: StepSettings, device: torch.device) -> Iterator[dict]:
    """Endless MONAI batches ``{"volume": [B, 1, S, A, R]}`` with the training stream's loader settings."""
    from monai.data import DataLoader, Dataset

    dataset = Dataset(data=[{"image": i["image"]} for i in items], transform=monai_transform(cfg))
    loader = DataLoader(dataset, batch_size=min(s.batch_size, len(dataset)), shuffle=True, drop_last=True,
                        num_workers=s.workers, pin_memory=device.type == "cuda", persistent_workers=s.workers > 0,
                        prefetch_factor=s.prefetch if s.workers > 0 else None,
                        generator=torch.Generator().manual_seed(s.seed))
    while True:
        for batch in loader:
            yield {"volume": batch["image"].as_tensor().permute(0, 1, 4, 3, 2)}  # RAS -> (S, A, R), as the cache


def baseline_difference(items: list[dict], site, cfg: sm.ModelConfig) -> tuple[float, float]:
    """(max, mean) abs difference between MONAI's output and the cached volume of the first study, in
    normalised units."""
    monai_volume = monai_transform(cfg)({"image": items[0]["image"]})["image"].as_tensor()[0].permute(2, 1, 0)
    cached = torch.from_numpy(np.asarray(load_volume(site.cache_dir, items[0]["cache_file"]), dtype=np.float32))
    difference = (monai_volume.float() - cached).abs()
    return float(difference.max()), float(difference.mean())


def evict(paths: Iterable[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages; no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drain(stream: Iterator[dict], batches: int, device: torch.device) -> tuple[float, float, int]:
    """(seconds for the first batch, seconds for all ``batches``, volumes) with each batch on the device."""
    volumes, started, first = 0, time.perf_counter(), 0.0
    for index in range(batches):
        batch = to_device(next(stream), device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        volumes += batch["volume"].shape[0]
        if index == 0:
            first = time.perf_counter() - started
    return first, time.perf_counter() - started, volumes


def print_loaders(site, items: list[dict], args: argparse.Namespace, device: torch.device) -> None:
    cfg = site.model_config()
    studies = len(items)
    batches = args.epochs * (studies // args.batch)
    cache_files = sorted(Path(site.cache_dir).rglob("*.npy"))  # every series: SiteDataset may draw any
    nifti_files = [Path(i["image"]) for i in items]
    print(f"\nLoader throughput: {batches} batches of {args.batch} ({args.epochs} epochs of {studies} studies), "
          f"{'x'.join(map(str, cfg.preprocess.size))} at {cfg.preprocess.spacing[0]:g} mm, to {device.type}"
          + ("; page cache evicted before each run" if args.cold else "; files in the page cache (just written)"))
    largest, mean = baseline_difference(items, site, cfg)
    hu_per_unit = cfg.preprocess.norm_std * (cfg.preprocess.hu_window[1] - cfg.preprocess.hu_window[0])
    print(f"MONAI output vs cached volume, first study: abs difference max {largest:.3f}, mean {mean:.4f} "
          f"(normalised units; 1 unit = {hu_per_unit:.0f} HU)")
    print("\n| loader | workers | first batch s | volumes/s (incl. start) |\n|---|---|---|---|")
    for workers in args.workers:
        s = StepSettings(steps=1, lr=0.0, weights={}, batch_size=args.batch, workers=workers)
        runs = [("ours: SiteDataset + Collate, memory-mapped float16 cache", cache_files,
                 functools.partial(our_stream, site, cfg, s, device)),
                ("MONAI: Dataset + LoadImaged ... ResizeWithPadOrCropd from NIfTI", nifti_files,
                 functools.partial(monai_stream, items, cfg, s, device))]
        for label, files, make in runs:
            if args.cold:
                evict(files)
            stream = make()
            first, seconds, volumes = drain(stream, batches, device)
            stream.close()  # ends the generator, so its workers stop
            print(f"| {label} | {workers} | {first:.2f} | {volumes / seconds:.1f} |", flush=True)


# ---- the wait fraction of real training ---------------------------------------------------------

def print_training_wait(site, args: argparse.Namespace, device: torch.device) -> None:
    cfg = site.model_config()
    torch.manual_seed(0)
    model = sm.build_model(cfg).to(device)
    weights = dict(cfg.objectives)
    optimizer = make_optimizer(model, StepSettings(steps=1, lr=1e-4, weights=weights), device)
    run_steps(model, [site.cache_dir], StepSettings(steps=2, lr=1e-4, weights=weights, batch_size=args.batch),
              optimizer, device)  # warm-up
    objectives = "+".join(k for k, w in weights.items() if w > 0)
    size = "x".join(map(str, cfg.preprocess.size))
    print(f"\nTraining: {args.train_steps} run_steps steps of the tiny model ({size}, batch {args.batch}, "
          f"objectives {objectives}, MAE alternating), {device.type}, {torch.get_num_threads()} torch threads")
    print("\n| workers | data-wait-fraction | volumes-per-second | train-seconds |\n|---|---|---|---|")
    for workers in args.workers:
        s = StepSettings(steps=args.train_steps, lr=1e-4, weights=weights, batch_size=args.batch, workers=workers,
                         seed=1)
        metrics = run_steps(model, [site.cache_dir], s, optimizer, device)
        print(f"| {workers} | {metrics['data-wait-fraction']:.3f} | {metrics['volumes-per-second']:.2f} | "
              f"{metrics['train-seconds']:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--size", type=int, help="cache volumes of N^3 at 320/N mm instead of the tiny preset's 64^3")
    parser.add_argument("--batch", type=int, default=4, help="studies per batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to measure")
    parser.add_argument("--epochs", type=int, default=3, help="epochs each loader measurement reads")
    parser.add_argument("--train-steps", type=int, default=10, help="run_steps steps per worker count")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nifti-zoom", type=float, default=1.0, help="resample the NIfTI originals by this factor")
    parser.add_argument("--cold", action="store_true", help="evict the files from the page cache before each run")
    parser.add_argument("--ingest-workers", type=int, default=2)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if args.size is not None and (args.size < 16 or args.size % 16):
        parser.error(f"--size should be a multiple of 16 (the tiny preset's patch), got {args.size}.")
    if args.studies < args.batch:
        parser.error(f"--studies ({args.studies}) should be at least --batch ({args.batch}).")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device.")
    root = Path(tempfile.mkdtemp(prefix="fedvlp-loader-bench-"))
    try:
        site = make_cohort(root, args.studies, args.size, args.ingest_workers)
        items = write_nifti_copies(site, args.nifti_zoom)
        print_loaders(site, items, args, device)
        if not args.skip_training:
            print_training_wait(site, args, device)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
