"""The synthetic sites: scanner and site profiles, and the per-study draws made from them.

A :class:`SiteProfile` says what a synthetic hospital scans (modality mix, scanners), how often each
finding occurs and how it exports its studies; :func:`sample_study` and :func:`scan_geometry` draw one
study's findings and one series' geometry from a profile with a ``numpy.random.Generator``. The phantoms
themselves are built by :mod:`shared_models.phantoms`, which re-exports every public name of this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .phantom_findings import BRAIN_FINDINGS, CHEST_FINDINGS, SEQUENCES
from .phantom_reports import REPORT_STYLES

__all__ = [
    "ScannerProfile", "SiteProfile", "SITE_PROFILES", "get_profile", "sample_modality", "sample_study",
    "scan_geometry",
]


@dataclass(frozen=True)
class ScannerProfile:
    """Acquisition settings of one scanner (sizes in mm; one scanner is drawn per study from its site's)."""

    name: str                             # identification; name, manufacturer and model go to DICOM headers
    manufacturer: str
    model: str
    modality: str                         # "CT" or "MR"
    matrix: tuple[int, ...]               # square in-plane matrix sizes to choose from
    fov_mm: tuple[float, float]           # in-plane field of view range; pixel spacing = fov / matrix
    slice_spacing_mm: tuple[float, ...]   # slice spacings to choose from
    coverage_mm: tuple[float, float]      # scanned length along the body axis
    noise_std: float                      # Gaussian noise std (CT: HU; MR: intensity before the gain)
    offset: float = 0.0                   # CT calibration offset (HU)
    gain: float = 1.0                     # MR intensity gain
    fov_pad: int = -1024                  # CT value outside the circular reconstruction field of view
    overlap: float = 1.0                  # slice thickness / slice spacing (> 1: overlapping reconstructions)
    kernel: str = "STANDARD"              # reconstruction kernel (CT) or sequence family (MR)


@dataclass(frozen=True)
class SiteProfile:
    """A synthetic hospital: what it scans, how often findings occur, and how it exports them."""

    name: str
    modality_mix: dict[str, float]                  # modality -> probability
    prevalence: dict[str, float]                    # finding -> probability of being planted
    scanners: dict[str, tuple[ScannerProfile, ...]]  # modality -> scanners, one drawn per study
    multiframe_fraction: float = 0.1                # DICOM studies written as enhanced multi-frame files
    nifti_fraction: float = 0.1                     # studies exported as NIfTI instead of DICOM
    studies_per_patient: tuple[float, ...] = (0.8, 0.15, 0.05)  # P(1, 2, 3, ... studies of one patient)
    extra_series_p: float = 0.2                     # P(a second, thicker CT reconstruction)
    localizer_p: float = 0.3                        # P(a localizer series of 1-3 images), DICOM studies
    report_styles: dict[str, float] = field(default_factory=lambda: {s: 1.0 for s in REPORT_STYLES})
    report_format: str = "csv"                      # "csv" (reports.csv) or "jsonl" (reports.jsonl)
    folder_styles: tuple[str, ...] = ("nested",)    # DICOM tree layouts: nested, dated, flat, series
    mr_sequences: tuple[str, ...] = SEQUENCES       # every MR study has these, co-registered


_CT_A = ScannerProfile("ct-general", "SYNTH Medical", "Helix 64", "CT", (128, 144), (360.0, 420.0), (3.0, 4.0, 5.0),
                       (290.0, 340.0), noise_std=12.0, offset=0.0, fov_pad=-1024, kernel="B31f")
_CT_B = ScannerProfile("ct-cardio", "Acme Imaging", "CardioSpin 256", "CT", (128,), (340.0, 400.0), (2.5,),
                       (280.0, 300.0), noise_std=18.0, offset=12.0, fov_pad=-2048, overlap=1.2, kernel="FC43")
_CT_C = ScannerProfile("ct-pulmonary", "Nordic Scan", "Pulmo 16", "CT", (96, 112, 128), (340.0, 400.0), (4.0, 5.0, 6.0),
                       (300.0, 350.0), noise_std=25.0, offset=-20.0, fov_pad=-3024, kernel="LUNG")
_MR_A = ScannerProfile("mr-neuro", "SYNTH Medical", "Magneton 3T", "MR", (96, 112, 128), (220.0, 240.0), (4.0, 5.0),
                       (150.0, 175.0), noise_std=18.0, gain=1.6, kernel="SE")


def _prev(names: Iterable[str], default: float, **special: float) -> dict[str, float]:
    keys = {k.replace("_", " ").capitalize(): v for k, v in special.items()}
    return {n: keys.get(n, default) for n in names}


SITE_PROFILES: dict[str, SiteProfile] = {
    "general": SiteProfile("general", {"CT": 1.0}, _prev(CHEST_FINDINGS, 0.4), {"CT": (_CT_A,)},
                           multiframe_fraction=0.15, nifti_fraction=0.1, extra_series_p=0.3, localizer_p=0.4,
                           folder_styles=("nested", "series")),
    "cardio": SiteProfile("cardio", {"CT": 1.0}, _prev(CHEST_FINDINGS, 0.15, cardiomegaly=0.65,
                          arterial_wall_calcification=0.7, medical_material=0.6, pericardial_effusion=0.35),
                          {"CT": (_CT_B,)}, multiframe_fraction=0.4, nifti_fraction=0.0, extra_series_p=0.2,
                          localizer_p=0.5, studies_per_patient=(0.6, 0.3, 0.1),
                          report_styles={"structured": 3.0, "bulleted": 1.0}, folder_styles=("dated",)),
    "pulmonary": SiteProfile("pulmonary", {"CT": 1.0}, _prev(CHEST_FINDINGS, 0.15, emphysema=0.65,
                             lung_nodule=0.65, consolidation=0.5, pleural_effusion=0.35), {"CT": (_CT_C,)},
                             multiframe_fraction=0.0, nifti_fraction=0.3, extra_series_p=0.1, localizer_p=0.2,
                             report_styles={"narrative": 2.0, "terse": 2.0}, folder_styles=("flat",)),
    "neuro": SiteProfile("neuro", {"MR": 1.0}, _prev(BRAIN_FINDINGS, 0.3), {"MR": (_MR_A,)},
                         multiframe_fraction=0.2, nifti_fraction=0.2, extra_series_p=0.0, localizer_p=0.3,
                         report_format="jsonl", folder_styles=("series",)),
    "central": SiteProfile("central", {"CT": 1.0}, _prev(CHEST_FINDINGS, 0.4), {"CT": (_CT_A, _CT_B, _CT_C)},
                           multiframe_fraction=0.2, nifti_fraction=0.15, extra_series_p=0.1, localizer_p=0.2,
                           folder_styles=("nested", "dated", "flat", "series")),
}
"""The synthetic sites: three CT sites with different prevalences and scanners, one brain MR site, and
"central" (CT, balanced prevalence, every CT scanner), the held-out evaluation cohort."""


def get_profile(profile: str | SiteProfile) -> SiteProfile:
    """A :class:`SiteProfile` by name (or the profile itself); ValueError listing the known names."""
    if isinstance(profile, SiteProfile):
        return profile
    if profile not in SITE_PROFILES:
        raise ValueError(f"Unknown site profile {profile!r}; known profiles: {sorted(SITE_PROFILES)}.")
    return SITE_PROFILES[profile]


def sample_modality(profile: str | SiteProfile, rng: np.random.Generator) -> str:
    """One modality drawn from the profile's modality mix."""
    mix = get_profile(profile).modality_mix
    names = sorted(mix)
    p = np.array([mix[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def sample_study(profile: str | SiteProfile, rng: np.random.Generator, modality: str | None = None) -> dict[str, bool]:
    """The findings of one study: every plantable finding of ``modality`` (drawn from the profile's mix
    when None) -> planted, each independently with the profile's prevalence."""
    prof = get_profile(profile)
    modality = modality or sample_modality(prof, rng)
    names = CHEST_FINDINGS if modality == "CT" else BRAIN_FINDINGS
    draws = rng.random(len(names))
    return {n: bool(d < prof.prevalence.get(n, 0.0)) for n, d in zip(names, draws)}


def scan_geometry(scanner: ScannerProfile,
                  rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[float, float, float], float]:
    """(shape (S, A, R), spacing (S, A, R) in mm, slice thickness in mm) of one series of ``scanner``."""
    matrix = int(rng.choice(scanner.matrix))
    pixel = round(float(rng.uniform(*scanner.fov_mm)) / matrix, 4)
    dz = float(rng.choice(scanner.slice_spacing_mm))
    n = int(round(float(rng.uniform(*scanner.coverage_mm)) / dz))
    return (n, matrix, matrix), (dz, pixel, pixel), round(dz * scanner.overlap, 3)
