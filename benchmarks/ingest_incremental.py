"""Ingest throughput and the cost of re-ingesting an unchanged export.

    .venv/bin/python benchmarks/ingest_incremental.py --studies 200 --workers 2

Writes a synthetic export (profile "general") of N studies, ingests it twice into a fresh cache
(the second run over the unchanged export should do almost no work), adds one study's worth of
change, and prints the wall times, series per second and cache size per study.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from client.ingest.pipeline import run_ingest
from client.site_config import load_site_config
from client.synth import write_synthetic_export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedvlp-ingest-bench-"))
    try:
        t = time.perf_counter()
        summary = write_synthetic_export(root / "export", "general", args.studies, seed=0)
        print(f"synthetic export: {summary.studies} studies, {summary.series} series, {summary.dicom_files} DICOM files "
              f"in {time.perf_counter() - t:.1f} s")
        config = {"site_id": "bench", "cache_dir": str(root / "cache"), "model": "tiny",
                  "data": {"dicom_root": str(root / "export" / "dicom"),
                           "nifti_manifest": str(root / "export" / "nifti_manifest.csv"),
                           "reports": {"path": str(root / "export" / "reports.csv")}},
                  "compute": {"workers": args.workers}}
        (root / "site.yaml").write_text(yaml.safe_dump(config))
        cfg = load_site_config(root / "site.yaml")
        first = run_ingest(cfg, progress=False)
        second = run_ingest(cfg, progress=False)
        series = first["series"]["ingested"]
        size = sum(p.stat().st_size for p in (root / "cache" / "volumes").glob("*.npy"))
        print(f"first ingest:  {first['duration_s']:7.1f} s  ({series} series, {series / first['duration_s']:.2f} series/s, "
              f"{first['files']['seen']} files)")
        print(f"second ingest: {second['duration_s']:7.1f} s  (processed {second['series']['processed']}, "
              f"reused {second['series']['reused']}); ratio {second['duration_s'] / first['duration_s']:.3f}")
        print(f"cache: {size / 1e6:.1f} MB for {first['studies']['ingested']} studies "
              f"({size / 1e6 / first['studies']['ingested']:.2f} MB per study, {size / 1e6 / series:.2f} MB per series)")
        print(json.dumps({"files": first["files"], "reasons": {k: v["count"] for k, v in first["reasons"].items()}}))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
