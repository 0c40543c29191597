"""The :class:`Phantom` record and the canvas the phantom builders of :mod:`shared_models.phantoms` paint on.

Arrays have axes (S, A, R); the canvas measures world coordinates in millimetres from the array centre
(see :mod:`shared_models.phantoms`). :class:`Phantom` and :data:`Vec` are re-exported there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .phantom_findings import MASK_LABELS

__all__ = ["Phantom", "Vec"]

_LABEL = {name: i + 1 for i, name in enumerate(MASK_LABELS)}
Vec = tuple[float, float, float]


@dataclass
class Phantom:
    """One synthetic volume with its ground truth (all arrays (S, A, R), one shape).

    Attributes:
        volume: CT in HU (``np.int16``, noise, offset and field of view applied) or MR intensities
            (``np.uint16``).
        spacing: voxel size in mm, (S, A, R) order.
        organs: ``np.uint8`` organ labels (:data:`~shared_models.phantoms.CHEST_ORGANS` or
            :data:`~shared_models.phantoms.BRAIN_ORGANS`).
        findings_mask: ``np.uint8`` finding labels (:data:`MASK_LABELS` index + 1).
        findings: every plantable finding of the modality -> planted or not.
        details: per planted finding, facts a report can state (side, lobe, size in mm, kind, ...).
        modality: ``"CT"`` or ``"MR"``; sequence: ``"T1"``/``"T2"``/``"FLAIR"`` for MR, else None.
    """

    volume: np.ndarray
    spacing: tuple[float, float, float]
    organs: np.ndarray
    findings_mask: np.ndarray
    findings: dict[str, bool]
    details: dict[str, dict] = field(default_factory=dict)
    modality: str = "CT"
    sequence: str | None = None


# ----------------------------------------------------------------------------------------- geometry

class _Canvas:
    """Arrays of one phantom plus world coordinates (mm, from the array centre) and painting helpers."""

    def __init__(self, shape: tuple[int, int, int], spacing: Vec, background: float) -> None:
        self.shape, self.spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
        self.axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(d)
                     for n, d in zip(self.shape, spacing)]
        self.vol = np.full(self.shape, background, np.float32)
        self.organs = np.zeros(self.shape, np.uint8)
        self.fmask = np.zeros(self.shape, np.uint8)

    def box(self, lo: Iterable[float], hi: Iterable[float]) -> tuple[slice, ...] | None:
        """Index slices of the voxels whose centres lie in [lo, hi] (mm per axis), None when empty."""
        out = []
        for ax, l, h in zip(self.axes, lo, hi):
            i0, i1 = int(np.searchsorted(ax, l, "left")), int(np.searchsorted(ax, h, "right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def coords(self, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z, y, x = (ax[s] for ax, s in zip(self.axes, box))
        return z[:, None, None], y[None, :, None], x[None, None, :]

    def ellipsoid(self, c: Vec, r: Vec, pad: float = 0.0):
        """(box, mask) of the ellipsoid with centre ``c`` and semi-axes ``r`` (z, y, x mm)."""
        box = self.box([ci - ri - pad for ci, ri in zip(c, r)], [ci + ri + pad for ci, ri in zip(c, r)])
        if box is None:
            return None, None
        z, y, x = self.coords(box)
        return box, ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1.0

    def capsule(self, p0: Vec, p1: Vec, radius: float):
        """(box, mask) of the segment p0-p1 thickened by ``radius`` (mm)."""
        a, b = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
        box = self.box(np.minimum(a, b) - radius, np.maximum(a, b) + radius)
        if box is None:
            return None, None
        z, y, x = self.coords(box)
        d = b - a
        t = np.clip(((z - a[0]) * d[0] + (y - a[1]) * d[1] + (x - a[2]) * d[2]) / max(float(d @ d), 1e-6), 0, 1)
        return box, (z - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (x - a[2] - t * d[2]) ** 2 <= radius**2

    def paint(self, box, mask, value: float | np.ndarray, organ: int | None = None, finding: str | None = None,
              within: int | None = None) -> int:
        """Set voxels of ``mask`` (restricted to organ ``within``): value, organ label (None keeps it) and
        finding label (anatomy clears it). Returns the number of voxels painted."""
        if box is None:
            return 0
        if within is not None:
            mask = mask & (self.organs[box] == within)
        v = self.vol[box]
        v[mask] = value if np.isscalar(value) else np.broadcast_to(value, mask.shape)[mask]
        if organ is not None:
            self.organs[box][mask] = organ
        self.fmask[box][mask] = _LABEL[finding] if finding else 0
        return int(mask.sum())


def _check(findings_present: Iterable[str], names: tuple[str, ...], kind: str) -> set[str]:
    present = set(findings_present)
    unknown = sorted(present - set(names))
    if unknown:
        raise ValueError(f"{kind} phantoms cannot plant {unknown}; plantable findings: {list(names)}.")
    return present


def _children(rng: np.random.Generator, names: tuple[str, ...]) -> dict[str, np.random.Generator]:
    seeds = rng.integers(0, 2**63 - 1, size=len(names))
    return {n: np.random.default_rng(int(s)) for n, s in zip(names, seeds)}


def _side(x: float) -> str:
    return "right" if x > 0 else "left"
