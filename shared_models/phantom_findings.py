"""What the synthetic phantoms can plant: the finding names, their ``findings_mask`` labels, MR sequences.

A leaf module (no phantom or site code) that :mod:`shared_models.phantom_canvas`,
:mod:`shared_models.phantom_sites` and :mod:`shared_models.phantoms` all import;
:mod:`shared_models.phantoms` re-exports every name defined here.
"""

from __future__ import annotations

from .vocabularies import BRAIN_MRI_FINDINGS, CT_RATE_FINDINGS

__all__ = ["CHEST_FINDINGS", "BRAIN_FINDINGS", "MASK_LABELS", "SEQUENCES"]

CHEST_FINDINGS: tuple[str, ...] = (
    "Lung nodule", "Pleural effusion", "Cardiomegaly", "Emphysema", "Consolidation", "Pericardial effusion",
    "Arterial wall calcification", "Medical material", "Lymphadenopathy", "Hiatal hernia",
)
"""CT-RATE findings that :func:`chest_ct_phantom` can plant."""
BRAIN_FINDINGS: tuple[str, ...] = (
    "Infarct", "Hemorrhage", "Mass", "White matter hyperintensities", "Hydrocephalus", "Atrophy",
)
"""Brain MRI findings that :func:`brain_mr_phantom` can plant."""
MASK_LABELS: tuple[str, ...] = CHEST_FINDINGS + BRAIN_FINDINGS
"""Finding names by ``findings_mask`` label: label ``i + 1`` is ``MASK_LABELS[i]``; 0 is background."""
SEQUENCES: tuple[str, ...] = ("T1", "T2", "FLAIR")
assert set(CHEST_FINDINGS) <= set(CT_RATE_FINDINGS) and set(BRAIN_FINDINGS) <= set(BRAIN_MRI_FINDINGS)
