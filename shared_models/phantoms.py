"""Synthetic 3D phantoms (chest CT, brain MR) with plantable findings.

Pure numpy. Arrays have axes (S, A, R): slices inferior->superior, posterior->anterior, left->right, as
:func:`shared_models.volumes.preprocess_volume` outputs. A phantom is built in millimetres around the
centre of its array (world RAS offsets: x -> patient right, y -> anterior, z -> superior), so two
phantoms drawn from equally seeded generators share their anatomy whatever their shape and spacing.

Every random draw comes from the ``numpy.random.Generator`` passed in, in a fixed order: the anatomy
first, then one child generator per plantable finding (drawn whether the finding is planted or not),
then the noise. Two calls with equally seeded generators and different finding sets therefore differ
only inside the planted findings' mask voxels (Atrophy also thins the cortex around its mask).

Findings are sized for the demo model's 5 mm voxels (nodules 12-20 mm, effusion layers 20-45 mm, ...).
Label maps: ``organs`` uses :data:`CHEST_ORGANS` / :data:`BRAIN_ORGANS`; ``findings_mask`` uses
``MASK_LABELS.index(name) + 1``. Cardiomegaly marks the whole (enlarged) heart, Hydrocephalus the
ventricles, Atrophy the CSF that replaced brain, the other findings their own lesion voxels.

Also importable from here (defined in sibling modules): the finding names, :data:`MASK_LABELS` and
:data:`SEQUENCES` (:mod:`~shared_models.phantom_findings`), :class:`Phantom` (:mod:`~shared_models.phantom_canvas`),
and the site/scanner profiles with their sampling functions (:mod:`~shared_models.phantom_sites`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .phantom_canvas import Phantom, Vec, _Canvas, _check, _children, _side
from .phantom_findings import BRAIN_FINDINGS, CHEST_FINDINGS, MASK_LABELS, SEQUENCES
from .phantom_sites import (
    _CT_A, _MR_A, SITE_PROFILES, ScannerProfile, SiteProfile, get_profile, sample_modality, sample_study, scan_geometry,
)

__all__ = [
    "chest_ct_phantom", "brain_mr_phantom", "make_phantom", "CHEST_ORGANS", "BRAIN_ORGANS",
    "Phantom", "Vec",                                                           # phantom_canvas
    "CHEST_FINDINGS", "BRAIN_FINDINGS", "MASK_LABELS", "SEQUENCES",             # phantom_findings
    "ScannerProfile", "SiteProfile", "SITE_PROFILES", "get_profile", "sample_modality", "sample_study",
    "scan_geometry",                                                            # phantom_sites
]

CHEST_ORGANS: dict[str, int] = {"body": 1, "lungs": 2, "heart": 3, "aorta": 4, "bone": 5, "airway": 6, "liver": 7}
"""Organ label ids of a chest CT phantom (0 = air outside the body)."""
BRAIN_ORGANS: dict[str, int] = {"brain": 1, "ventricles": 2, "csf": 3, "skull": 4, "scalp": 5}
"""Organ label ids of a brain MR phantom (0 = air outside the head)."""


# ----------------------------------------------------------------------------------------- chest CT

def chest_ct_phantom(findings_present: Iterable[str], rng: np.random.Generator,
                     shape: tuple[int, int, int] = (80, 128, 128), spacing: Vec = (4.0, 3.0, 3.0),
                     scanner: ScannerProfile | None = None) -> Phantom:
    """A chest CT phantom in HU with the given findings planted (see the module docstring).

    Args:
        findings_present: names from :data:`CHEST_FINDINGS` to plant.
        rng: the generator (all draws, anatomy first).
        shape, spacing: array shape and voxel size (S, A, R); about 300 mm along S covers the lungs.
        scanner: noise std, HU offset and field-of-view padding (default: the "general" site's scanner).
    """
    present = _check(findings_present, CHEST_FINDINGS, "Chest CT")
    sc = scanner or _CT_A
    u = rng.uniform
    brx, bry, fat = u(145, 170), u(100, 118), u(8, 22)
    lrz, lcz = u(105, 122), u(0, 15)
    lrx, lry, lcx = brx * u(0.33, 0.37), bry * u(0.66, 0.72), brx * u(0.41, 0.44)
    hs, hz, hx = u(0.9, 1.04), lcz - lrz * u(0.3, 0.4), u(-22, -10)
    contrast = bool(rng.random() < 0.6)
    blood = u(180, 260) if contrast else u(35, 50)
    kids = _children(rng, CHEST_FINDINGS)
    noise_rng = np.random.default_rng(int(rng.integers(0, 2**63 - 1)))

    cv = _Canvas(shape, spacing, -1000.0)
    z_all = (float(cv.axes[0][0]) - 50, float(cv.axes[0][-1]) + 50)
    body = cv.box((z_all[0], -bry, -brx), (z_all[1], bry, brx))
    zb, yb, xb = cv.coords(body)
    full = (zb.shape[0], yb.shape[1], xb.shape[2])
    rho = np.broadcast_to(np.sqrt((yb / bry) ** 2 + (xb / brx) ** 2), full)
    edge = 1.0 - fat / bry
    cv.paint(body, rho <= 1.0, -100.0, CHEST_ORGANS["body"])                     # subcutaneous fat
    cv.paint(body, rho <= edge, 45.0, CHEST_ORGANS["body"])                       # chest wall muscle
    cv.paint(body, rho <= edge - 0.08, 20.0, CHEST_ORGANS["body"])                # inner soft tissue
    cv.paint(*cv.ellipsoid((lcz - lrz - 30, -5, 45), (90, 0.8 * bry, 0.75 * brx)), 55.0, CHEST_ORGANS["liver"])
    cv.paint(*cv.ellipsoid((lcz + 0.25 * lrz, 15, 0), (0.75 * lrz, 45, 35)), -90.0, CHEST_ORGANS["body"])
    lungs: dict[int, tuple[Vec, Vec]] = {}
    lung = CHEST_ORGANS["lungs"]
    for side in (-1, 1):
        c, r = (lcz + (4 if side > 0 else 0), -8.0, side * lcx), (lrz - (8 if side > 0 else 0), lry, lrx)
        lungs[side] = (c, r)
        b, m = cv.ellipsoid(c, r)
        zz, yy, xx = cv.coords(b)
        tex = (-850.0 + 25 * np.sin(zz / 23.0) * np.cos(yy / 17.0) + 15 * np.sin(xx / 13.0)
               + 40 * (yy < c[1] - 0.4 * r[1]))                                # denser dependent lung
        cv.paint(b, m, tex, lung)
        hilum = (hz + 55 * hs, 0.0, side * 30.0)
        for _ in range(8):                                                        # pulmonary vessels
            end = np.array(c) + np.array(r) * rng.uniform(-0.75, 0.75, 3)
            cv.paint(*cv.capsule(hilum, tuple(end), float(u(2.0, 3.5))), 40.0, within=lung)
    details: dict[str, dict] = {}
    # heart, pericardium, great vessels, airways, mediastinum
    g = kids["Cardiomegaly"]
    mega = float(g.uniform(1.3, 1.48))
    hs_eff = hs * (mega if "Cardiomegaly" in present else 1.0)
    hc, hr = (hz, 12.0, hx), (50 * hs_eff, 45 * hs_eff, 58 * hs_eff)
    g = kids["Pericardial effusion"]
    rim = float(g.uniform(8, 15))
    if "Pericardial effusion" in present:
        cv.paint(*cv.ellipsoid(hc, tuple(ri + rim for ri in hr)), 10.0, finding="Pericardial effusion")
        details["Pericardial effusion"] = {"size": "small" if rim < 11 else "moderate"}
    cfind = "Cardiomegaly" if "Cardiomegaly" in present else None
    cv.paint(*cv.ellipsoid(hc, hr), 48.0, CHEST_ORGANS["heart"], finding=cfind)
    cv.paint(*cv.ellipsoid(hc, tuple(0.68 * ri for ri in hr)), blood, CHEST_ORGANS["heart"], finding=cfind)
    if cfind:
        details["Cardiomegaly"] = {"severity": "mild" if mega < 1.38 else "moderate"}
    ar, dr = u(13, 17), u(10, 13)
    z_arch = lcz + 0.45 * lrz
    asc0, asc1 = (hz + 0.5 * 50 * hs, 18.0, 8.0), (z_arch, 15.0, 6.0)
    desc0, desc1 = (z_arch, -45.0, -22.0), (z_all[0], -52.0, -20.0)
    aorta = [(asc0, asc1, ar), (asc1, desc0, ar * 0.9), (desc0, desc1, dr)]
    for p0, p1, rad in aorta:
        cv.paint(*cv.capsule(p0, p1, rad), blood, CHEST_ORGANS["aorta"])
    g = kids["Arterial wall calcification"]
    plaques = []
    for _ in range(int(g.integers(7, 14))):
        p0, p1, rad = aorta[int(g.integers(0, 3))]
        t, ang, prad = g.uniform(0.05, 0.95), g.uniform(0, 2 * np.pi), float(g.uniform(8, 14))
        ctr = np.array(p0) + t * (np.array(p1) - np.array(p0))
        plaques.append((ctr[0] + 0.5 * prad * np.cos(ang), ctr[1] + rad * np.sin(ang), ctr[2] + rad * np.cos(ang),
                        prad))
    if "Arterial wall calcification" in present:
        for pz, py, px, prad in plaques:
            cv.paint(*cv.ellipsoid((pz, py, px), (prad, 5.0, 5.0)), 850.0, finding="Arterial wall calcification")
        details["Arterial wall calcification"] = {"severity": "mild" if len(plaques) < 10 else "moderate"}
    carina = z_arch - 12
    cv.paint(*cv.capsule((z_all[1], 5, 0), (carina, 2, 0), 9.0), -1000.0, CHEST_ORGANS["airway"])
    for side in (-1, 1):
        cv.paint(*cv.capsule((carina, 2, 0), (carina - 35, -5, side * 42), 6.0), -1000.0, CHEST_ORGANS["airway"])
    g = kids["Lymphadenopathy"]
    stations = {"paratracheal": (carina + 25, 8.0, 18.0), "subcarinal": (carina - 22, -10.0, 0.0),
                "hilar": (carina - 30, 0.0, -45.0), "prevascular": (z_arch - 5, 38.0, -5.0)}
    chosen = [str(s) for s in g.choice(list(stations), size=int(g.integers(1, 4)), replace=False)]
    node_r = g.uniform(8, 13, len(chosen))
    if "Lymphadenopathy" in present:
        for st, rad in zip(chosen, node_r):
            cv.paint(*cv.ellipsoid(stations[st], (rad * 1.2, rad, rad)), 38.0, finding="Lymphadenopathy")
        details["Lymphadenopathy"] = {"station": chosen[0], "size_mm": int(round(2 * max(node_r)))}
    g = kids["Hiatal hernia"]
    hh_c, hh_r = (hz - 0.55 * 50 * hs - 10, -30.0, -8.0), tuple(float(v) for v in g.uniform(18, 28, 3))
    if "Hiatal hernia" in present:
        cv.paint(*cv.ellipsoid(hh_c, hh_r), 35.0, finding="Hiatal hernia")
        cv.paint(*cv.ellipsoid((hh_c[0] + 0.4 * hh_r[0], hh_c[1], hh_c[2]), (0.45 * hh_r[0],) * 3), -1000.0,
                 finding="Hiatal hernia")
        details["Hiatal hernia"] = {"size": "small" if max(hh_r) < 24 else "moderate"}
    # skeleton: vertebrae with discs, spinal canal, obliquely running ribs, sternum
    sy, bone = -bry + fat + 30, CHEST_ORGANS["bone"]
    b = cv.box((z_all[0], sy - 30, -18), (z_all[1], sy + 18, 18))
    zz, yy, xx = cv.coords(b)
    disc = np.abs(((zz + 200) % 28.0) - 14) > 3
    cv.paint(b, ((yy - sy) ** 2 + xx**2 <= 17**2) & disc, 650.0, bone)
    cv.paint(b, np.broadcast_to((yy - sy + 24) ** 2 + xx**2 <= 6**2, cv.organs[b].shape), 15.0, CHEST_ORGANS["body"])
    ribs = ((np.abs(rho - (edge - 0.05)) < 0.035) & (((zb - 0.35 * yb + 500) % 27.0) < 9.0)
            & ~((np.abs(xb) < 35) & (yb > 0)))
    cv.paint(body, ribs, 700.0, bone)
    cv.paint(*cv.ellipsoid((lcz + 0.1 * lrz, bry * edge - 14, 0), (0.55 * lrz, 7, 14)), 420.0, bone)

    def lung_point(g: np.random.Generator, side: int, upper: bool | None = None, scale: float = 0.6) -> Vec:
        """A point well inside one lung, away from the heart (at its largest) and the hilum."""
        c, r = lungs[side]
        heart_max = (50 * hs * 1.5 + 20, 45 * hs * 1.5 + 20, 58 * hs * 1.5 + 20)
        for _ in range(100):
            p = np.array(c) + np.array(r) * g.uniform(-scale, scale, 3)
            if upper is not None and (p[0] > c[0]) != upper:
                continue
            if sum(((p[i] - (hz, 12.0, hx)[i]) / heart_max[i]) ** 2 for i in range(3)) > 1 and abs(p[2]) > 40:
                return tuple(float(v) for v in p)
        return (c[0] + 0.5 * r[0], c[1], c[2] + side * 0.3 * r[2])

    g = kids["Emphysema"]
    sev = str(g.choice(["mild", "moderate", "severe"]))
    patches = [(lung_point(g, int(g.choice([-1, 1])), upper=True), float(g.uniform(12, 22)))
               for _ in range(g.integers(7, 14))]
    bullae = [(lung_point(g, int(g.choice([-1, 1])), upper=True, scale=0.5), float(g.uniform(8, 15))) for _ in range(2)]
    if "Emphysema" in present:
        for p, rad in patches:
            cv.paint(*cv.ellipsoid(p, (rad,) * 3), -955.0, finding="Emphysema", within=lung)
        for p, rad in bullae:
            cv.paint(*cv.ellipsoid(p, (rad,) * 3), -995.0, finding="Emphysema", within=lung)
        details["Emphysema"] = {"severity": sev, "zone": "upper"}
    g = kids["Consolidation"]
    cside, cupper = int(g.choice([-1, 1])), bool(g.random() < 0.35)
    cc, crad = lung_point(g, cside, upper=cupper, scale=0.45), g.uniform(22, 38, 3)
    bronchograms = [tuple(float(v) for v in np.array(cc) + crad * g.uniform(-0.7, 0.7, 3)) for _ in range(2)]
    if "Consolidation" in present:
        cv.paint(*cv.ellipsoid(cc, tuple(crad)), 30.0, finding="Consolidation", within=lung)
        for end in bronchograms:
            cv.paint(*cv.capsule(cc, end, 2.0), -900.0, finding="Consolidation", within=lung)
        details["Consolidation"] = {"side": _side(cside), "lobe": "upper" if cupper else "lower"}
    g = kids["Pleural effusion"]
    eside = str(g.choice(["left", "right", "bilateral"], p=[0.35, 0.35, 0.3]))
    depth, height = float(g.uniform(20, 45)), float(g.uniform(0.5, 0.9))
    if "Pleural effusion" in present:
        for side in ((-1, 1) if eside == "bilateral" else ((1,) if eside == "right" else (-1,))):
            c, r = lungs[side]
            top = c[0] - r[0] + 2 * height * r[0]
            b = cv.box((c[0] - r[0], c[1] - r[1], c[2] - r[2]), (top, c[1] + r[1], c[2] + r[2]))
            zz, yy, _ = cv.coords(b)
            level = c[1] - r[1] + depth * (1.0 + 1.5 * np.clip((top - zz) / (top - c[0] + r[0]), 0, 1))
            cv.paint(b, np.broadcast_to(yy < level, cv.organs[b].shape), 12.0, finding="Pleural effusion", within=lung)
        details["Pleural effusion"] = {"side": eside, "size": "small" if depth < 32 else "moderate"}
    g = kids["Lung nodule"]
    nods = [(lung_point(g, int(g.choice([-1, 1])), scale=0.5), float(g.uniform(6.0, 10.0)))
            for _ in range(int(g.choice([1, 1, 2, 3])))]
    if "Lung nodule" in present:
        for p, rad in nods:
            cv.paint(*cv.ellipsoid(p, (rad,) * 3), 35.0, finding="Lung nodule", within=lung)
        (bz, _, bx), brad = max(nods, key=lambda n: n[1])
        sides = {_side(p[2]) for p, _ in nods}
        details["Lung nodule"] = {"count": len(nods), "size_mm": int(round(2 * brad)),
                                  "side": sides.pop() if len(sides) == 1 else "bilateral",
                                  "lobe": "upper" if bz > lungs[1 if bx > 0 else -1][0][0] else "lower"}
    g = kids["Medical material"]
    kind = str(g.choice(["pacemaker", "port", "sternotomy wires"]))
    if "Medical material" in present:
        mm, front = "Medical material", bry * edge
        if kind == "sternotomy wires":
            for k in range(int(g.integers(5, 8))):
                zk = lcz - 0.3 * lrz + k * 16
                cv.paint(*cv.capsule((zk, front - 14, -16), (zk, front - 14, 16), 2.5), 2800.0, finding=mm)
        else:
            xs = -1 if kind == "pacemaker" else 1
            dev = (lcz + 0.55 * lrz, bry * 0.89 - 0.5 * fat - 2, xs * 0.45 * brx)    # under the skin
            cv.paint(*cv.ellipsoid(dev, (20, 6, 22) if kind == "pacemaker" else (12, 7, 12)), 3000.0, finding=mm)
            tip = (hz + 0.3 * hr[0], 10.0, 15.0) if kind == "pacemaker" else (hz + hr[0], 15.0, 12.0)
            mid = (z_arch + 15, 20.0, xs * 25.0)
            for p0, p1 in ((dev, mid), (mid, tip)):
                cv.paint(*cv.capsule(p0, p1, 2.5), 2500.0, finding=mm)
        details[mm] = {"kind": kind}
    # scanner: offset, noise, circular field of view
    noise = noise_rng.standard_normal(cv.shape, dtype=np.float32)
    vol = cv.vol + np.float32(sc.offset) + noise * np.float32(sc.noise_std)
    yy, xx = cv.axes[1][:, None], cv.axes[2][None, :]
    outside = yy**2 + xx**2 > (min(cv.axes[1][-1], cv.axes[2][-1]) + 0.5 * min(spacing[1:])) ** 2
    vol = np.clip(np.rint(vol), -1024, 3071)
    vol[:, outside] = sc.fov_pad
    return Phantom(vol.astype(np.int16), cv.spacing, cv.organs, cv.fmask,
                   {n: n in present for n in CHEST_FINDINGS}, details, "CT", None)


# ----------------------------------------------------------------------------------------- brain MR

# tissue -> (T1, T2, FLAIR) intensities (arbitrary units before the scanner gain)
_MR_TISSUE = {
    "air": (0, 0, 0), "scalp": (900, 700, 600), "skull": (80, 60, 60), "csf": (250, 1600, 120), "gm": (560, 900, 760),
    "wm": (820, 640, 600), "infarct": (380, 1350, 1150), "hemorrhage": (1150, 330, 480), "mass": (470, 1150, 1000),
    "necrosis": (300, 1500, 450), "wmh": (680, 1150, 1200),
}


def brain_mr_phantom(findings_present: Iterable[str], rng: np.random.Generator, sequence: str = "T1",
                     shape: tuple[int, int, int] = (40, 112, 112), spacing: Vec = (4.0, 2.0, 2.0),
                     scanner: ScannerProfile | None = None) -> Phantom:
    """A brain MR phantom (``np.uint16`` intensities) for one sequence, findings planted.

    The anatomy and the findings' geometry do not depend on ``sequence``: build the T1, T2 and FLAIR of
    one study from equally seeded generators and they are co-registered (identical label maps). The
    noise differs per sequence. Infarct: dark on T1, bright on T2/FLAIR; hemorrhage (subacute): bright
    on T1, dark on T2; mass with a necrotic core; white matter hyperintensities bright on T2 and FLAIR.
    """
    if sequence not in SEQUENCES:
        raise ValueError(f"Unknown MR sequence {sequence!r}; choose one of {list(SEQUENCES)}.")
    present = _check(findings_present, BRAIN_FINDINGS, "Brain MR")
    sc = scanner or _MR_A
    si = SEQUENCES.index(sequence)
    val = {k: float(v[si]) for k, v in _MR_TISSUE.items()}
    u = rng.uniform
    hr = (u(85, 95), u(92, 102), u(70, 78))                       # head semi-axes (z, y, x)
    hc = (u(-8, 8), u(-5, 5), u(-3, 3))
    scalp, skull, csf = u(4, 7), u(5, 8), u(2, 3.5)
    freq = u(0.22, 0.3, 3)
    kids = _children(rng, BRAIN_FINDINGS)
    noise_seed = int(rng.integers(0, 2**63 - 1))
    atrophy = "Atrophy" in present
    brain_id, ventricles = BRAIN_ORGANS["brain"], BRAIN_ORGANS["ventricles"]
    cv = _Canvas(shape, spacing, val["air"])
    box = cv.box(tuple(c - r - 2 for c, r in zip(hc, hr)), tuple(c + r + 2 for c, r in zip(hc, hr)))
    z, y, x = cv.coords(box)
    dz, dy, dx = z - hc[0], y - hc[1], x - hc[2]
    rho = np.sqrt((dz / hr[0]) ** 2 + (dy / hr[1]) ** 2 + (dx / hr[2]) ** 2)
    mean_r = float(np.mean(hr))
    depth = mean_r * rho                                          # ~ mm from the head centre
    cv.paint(box, rho <= 1, val["scalp"], BRAIN_ORGANS["scalp"])
    cv.paint(box, depth <= mean_r - scalp, val["skull"], BRAIN_ORGANS["skull"])
    cv.paint(box, depth <= mean_r - scalp - skull, val["csf"], BRAIN_ORGANS["csf"])
    sulci = np.sin(dz * freq[0]) * np.sin(dy * freq[1]) * np.sin(dx * freq[2])
    surface = mean_r - scalp - skull - csf

    def brain_mask(shrink: float, groove: float) -> np.ndarray:
        edge = surface * shrink - groove * np.maximum(sulci, 0)
        return (depth <= edge) & ~((np.abs(dx) < 1.5 + 3 * (1 - shrink) * 10) & (depth > 0.45 * surface))

    normal_brain = brain_mask(1.0, 5.0)
    g = kids["Atrophy"]
    shrink = float(g.uniform(0.86, 0.91))
    brain = brain_mask(shrink, 12.0) if atrophy else normal_brain
    cortex = depth > (surface * (shrink if atrophy else 1.0) - 5.0 - (12.0 if atrophy else 5.0) * np.maximum(sulci, 0))
    tissue = np.where(cortex, val["gm"], val["wm"]).astype(np.float32)
    cv.paint(box, brain, tissue, BRAIN_ORGANS["brain"])
    if atrophy:
        cv.paint(box, normal_brain & ~brain, val["csf"], BRAIN_ORGANS["csf"], finding="Atrophy")
        details_atrophy = {"severity": "mild" if shrink > 0.885 else "moderate"}
    for side in (-1, 1):                                          # deep grey nuclei
        cv.paint(*cv.ellipsoid((hc[0] + 5, hc[1] + 2, hc[2] + side * 18), (10, 14, 7)), val["gm"], brain_id)
    g = kids["Hydrocephalus"]
    vscale = float(g.uniform(1.7, 2.1)) if "Hydrocephalus" in present else (1.25 if atrophy else 1.0)
    vfind = "Hydrocephalus" if "Hydrocephalus" in present else ("Atrophy" if atrophy else None)  # ex vacuo
    for side in (-1, 1):                                          # lateral ventricles grow around their centres
        cv.paint(*cv.ellipsoid((hc[0] + 12, hc[1] + 4, hc[2] + side * 11),
                               (10 * vscale, 30 * min(vscale, 1.3), 5.5 * vscale)), val["csf"], ventricles, vfind)
    cv.paint(*cv.ellipsoid((hc[0] + 2, hc[1], hc[2]), (9, 11, 2 * vscale)), val["csf"], ventricles, vfind)
    details: dict[str, dict] = {"Atrophy": details_atrophy} if atrophy else {}
    if "Hydrocephalus" in present:
        details["Hydrocephalus"] = {}

    def site(g: np.random.Generator, deep: bool) -> tuple[Vec, str, str]:
        side = int(g.choice([-1, 1]))
        lobe = str(g.choice(["frontal", "parietal", "temporal", "occipital"]))
        frac = 0.35 if deep else 0.62
        off = {"frontal": (20, 0.6, 0.55), "parietal": (35, -0.2, 0.6), "temporal": (-15, 0.1, 0.8),
               "occipital": (15, -0.7, 0.45)}[lobe]
        k = frac / 0.6
        c = (hc[0] + off[0] * k, hc[1] + off[1] * surface * k, hc[2] + side * off[2] * surface * k)
        return c, _side(side), lobe

    g = kids["Infarct"]
    ic, iside, ilobe = site(g, deep=False)
    irad, age = tuple(g.uniform(14, 22, 3)), str(g.choice(["acute", "chronic"]))
    if "Infarct" in present:
        cv.paint(*cv.ellipsoid(ic, irad), val["infarct"], finding="Infarct", within=brain_id)
        details["Infarct"] = {"side": iside, "lobe": ilobe, "age": age}
    g = kids["Hemorrhage"]
    mc, mside, mlobe = site(g, deep=bool(g.random() < 0.5))
    mrad = float(g.uniform(10, 18))
    if "Hemorrhage" in present:
        cv.paint(*cv.ellipsoid(mc, (mrad,) * 3), val["hemorrhage"], finding="Hemorrhage", within=brain_id)
        details["Hemorrhage"] = {"side": mside, "lobe": mlobe, "size_mm": int(round(2 * mrad))}
    g = kids["Mass"]
    tc, tside, tlobe = site(g, deep=True)
    trad = float(g.uniform(13, 20))
    if "Mass" in present:
        cv.paint(*cv.ellipsoid(tc, (trad,) * 3), val["mass"], BRAIN_ORGANS["brain"], finding="Mass")
        cv.paint(*cv.ellipsoid(tc, (0.45 * trad,) * 3), val["necrosis"], BRAIN_ORGANS["brain"], finding="Mass")
        details["Mass"] = {"side": tside, "lobe": tlobe, "size_mm": int(round(2 * trad))}
    g = kids["White matter hyperintensities"]
    foci = [(hc[0] + g.uniform(0, 30), hc[1] + g.uniform(-40, 40), hc[2] + g.choice([-1, 1]) * g.uniform(14, 30))
            for _ in range(int(g.integers(10, 18)))]
    frad = g.uniform(5.0, 9.0, len(foci))
    if "White matter hyperintensities" in present:
        for c, rad in zip(foci, frad):
            b, m = cv.ellipsoid(tuple(float(v) for v in c), (float(rad),) * 3)
            if b is not None:
                m = m & (cv.vol[b] == val["wm"])
            cv.paint(b, m, val["wmh"], finding="White matter hyperintensities", within=brain_id)
        details["White matter hyperintensities"] = {"severity": "mild" if len(foci) < 14 else "moderate"}
    # scanner: smooth bias field, gain, Rician noise
    nrng = np.random.default_rng([noise_seed, si])
    bias = [1 + c * ax / 100.0 for c, ax in zip(nrng.uniform(-0.08, 0.08, 3), cv.axes)]
    field_ = bias[0][:, None, None] * bias[1][None, :, None] * bias[2][None, None, :]
    sig = cv.vol * field_ * np.float32(sc.gain)
    n1 = nrng.standard_normal(cv.shape, dtype=np.float32) * np.float32(sc.noise_std)
    n2 = nrng.standard_normal(cv.shape, dtype=np.float32) * np.float32(sc.noise_std)
    vol = np.sqrt((sig + n1) ** 2 + n2**2)
    vol = np.clip(np.rint(vol), 0, 65535).astype(np.uint16)
    return Phantom(vol, cv.spacing, cv.organs, cv.fmask, {n: n in present for n in BRAIN_FINDINGS}, details, "MR",
                   sequence)


def make_phantom(modality: str, findings: dict[str, bool] | Iterable[str], rng: np.random.Generator,
                 shape: tuple[int, int, int], spacing: Vec, scanner: ScannerProfile | None = None,
                 sequence: str = "T1") -> Phantom:
    """:func:`chest_ct_phantom` (``"CT"``) or :func:`brain_mr_phantom` (``"MR"``) of the planted findings."""
    names = [k for k, v in findings.items() if v] if isinstance(findings, dict) else list(findings)
    if modality == "CT":
        return chest_ct_phantom(names, rng, shape, spacing, scanner)
    if modality == "MR":
        return brain_mr_phantom(names, rng, sequence, shape, spacing, scanner)
    raise ValueError(f"Unknown phantom modality {modality!r}; expected 'CT' or 'MR'.")
