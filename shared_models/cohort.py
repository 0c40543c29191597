"""A cohort cache (what ``fedvlp-site ingest`` writes) read back as batches for every objective.

Sites train on their cache and the central evaluator reads a held-out cohort's cache, so the
reading side lives here, shared; the writing side is the site's ingest (``client.ingest``).

:class:`SiteDataset` yields one study per item: its primary volume, up to ``max_scans`` scans for
HLIP studies, the report (augmented as COLIPRI does: sentence shuffle, short-sentence reports), the
report to generate, and the findings. :class:`Collate` stacks items into the batch keys
:mod:`shared_models.model` documents, adding OSL sentence pairs and T3D's random local views.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import augment_volumes
from .config import ModelConfig
from .objectives import osl_inputs
from .reports import augment_report, findings_vector, report_body, structured_findings_report
from .volumes import random_views

MANIFEST = "manifest.jsonl"
INGEST_REPORT = "ingest_report.json"


def read_manifest(cache_dir: str | Path, skip_damaged: bool = False) -> list[dict[str, Any]]:
    """The manifest rows of a cohort cache (one per ingested series); [] when there is none.

    A damaged line (not JSON, not an object) raises ValueError naming the file, the line and what to do,
    or with ``skip_damaged`` is left out (ingest, which rewrites the manifest, then reprocesses its series).
    """
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as err:
            if skip_damaged:
                continue
            raise ValueError(f"{path}:{number}: damaged manifest line ({err}); re-run `fedvlp-site ingest` to "
                             "rewrite the cache's manifest") from None
        rows.append(row)
    return rows


def load_volume(cache_dir: str | Path, relative: str, mmap: bool = True) -> np.ndarray:
    """A cached preprocessed volume ``[D, H, W]`` (float16), memory-mapped by default."""
    return np.load(Path(cache_dir) / relative, mmap_mode="r" if mmap else None)


class SiteDataset(Dataset):
    """Studies of a site cache.

    Args:
        cache_dir: the site's ``cache_dir`` (after ``fedvlp-site ingest``).
        model_cfg: the model config (vocabulary, multi-view sizes).
        with_reports: True = studies with a report only (vision-language batches); False = every study
            (vision-only MAE batches).
        augment: COLIPRI's report augmentation and a random scan choice; off for evaluation.
        max_scans: scans per study kept for hierarchical (HLIP) models.
        seed: base seed of the per-item randomness (combined with the epoch and the index).
    """

    def __init__(self, cache_dir: str | Path, model_cfg: ModelConfig, with_reports: bool = True,
                 augment: bool = True, max_scans: int = 8, seed: int = 0) -> None:
        self.cache_dir = Path(cache_dir)
        self.cfg = model_cfg
        self.augment = augment
        self.max_scans = max_scans
        self.seed = seed
        self.epoch = 0
        by_study: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in read_manifest(self.cache_dir):
            by_study[row["study_uid"]].append(row)
        self.studies = []
        for study_uid in sorted(by_study):
            series = sorted(by_study[study_uid], key=lambda r: (-r.get("num_slices", 0), r["series_key"]))
            if with_reports and series[0]["report"] is None:
                continue
            self.studies.append({"study_uid": study_uid, "series": series, "report": series[0]["report"],
                                 "findings": series[0]["findings"] or {}})
        if not self.studies:
            what = "studies with a report" if with_reports else "ingested studies"
            raise ValueError(f"no {what} in {self.cache_dir}; run fedvlp-site ingest and fedvlp-site check first.")

    def __len__(self) -> int:
        return len(self.studies)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _volume(self, row: dict[str, Any]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(load_volume(self.cache_dir, row["cache_file"]), dtype=np.float32))[None]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = random.Random(hash((self.seed, self.epoch, index)))
        study = self.studies[index]
        series = study["series"]
        primary = rng.choice(series) if self.augment else series[0]
        item: dict[str, Any] = {"volume": self._volume(primary), "findings": study["findings"]}
        if self.cfg.vision.study_attention_every > 0:
            item["study"] = torch.stack([self._volume(r) for r in series[: self.max_scans]])
        if study["report"] is not None:
            body = report_body(study["report"])
            if self.cfg.decoder.target == "findings":
                item["report_target"] = structured_findings_report(study["findings"], self.cfg.vocabulary)
            else:
                item["report_target"] = body
            if self.augment:
                variants = self.cfg.augment.report_variants
                text_rng = random.Random(hash((self.seed, index, self.epoch % variants))) if variants else rng
                item["report"] = augment_report(study["report"], study["findings"], text_rng)
            else:
                item["report"] = body
        return item


class Collate:
    """Stack items into a model batch; picklable, so DataLoader workers run it.

    Args:
        model_cfg: the model config (vocabulary and multi-view settings).
        max_osl_pairs: OSL sentence pairs drawn per study (default: the config's ``osl_pairs``; 0 = all).
        seed: seed of the OSL phrasing, view positions and volume augmentation (advanced per batch).
        augment: apply the config's ``augment`` section to the volumes (training batches only).
    """

    def __init__(self, model_cfg: ModelConfig, max_osl_pairs: int | None = None, seed: int = 0,
                 augment: bool = False) -> None:
        self.cfg = model_cfg
        self.augment = augment
        pairs = model_cfg.osl_pairs if max_osl_pairs is None else max_osl_pairs
        self.max_osl_pairs = pairs or None
        self.seed = seed
        self.calls = 0

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls += 1
        worker = torch.utils.data.get_worker_info()  # each DataLoader worker has its own copy of this object
        rng = random.Random(hash((self.seed, worker.id if worker else -1, self.calls)))
        generator = torch.Generator().manual_seed(rng.getrandbits(63))
        findings = [item["findings"] for item in items]
        labels, masks = zip(*(findings_vector(f, self.cfg.vocabulary) for f in findings))
        volumes = torch.stack([item["volume"] for item in items])
        if self.augment:
            volumes = augment_volumes(volumes, self.cfg.augment, generator)
        batch: dict[str, Any] = {
            "volume": volumes,
            "findings": findings,
            "finding_labels": torch.tensor(labels),
            "finding_mask": torch.tensor(masks),
        }
        if all("report" in item for item in items):
            batch["report"] = [item["report"] for item in items]
            batch["report_target"] = [item["report_target"] for item in items]
            batch.update(osl_inputs(findings, rng, self.max_osl_pairs))
        if "study" in items[0]:
            most = max(item["study"].shape[0] for item in items)
            study = torch.zeros(len(items), most, *items[0]["study"].shape[1:])
            mask = torch.zeros(len(items), most, dtype=torch.bool)
            for i, item in enumerate(items):
                study[i, : item["study"].shape[0]] = item["study"]
                mask[i, : item["study"].shape[0]] = True
            batch["study"], batch["study_mask"] = study, mask
        mv = self.cfg.multiview
        if self.cfg.objectives.get("multiview", 0) > 0 and all(v <= s for v, s in zip(mv.view_size, volumes.shape[2:])):
            batch["views"] = random_views(volumes, mv.num_views, mv.view_size, generator)
        return batch
