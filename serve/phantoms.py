"""Synthetic body-like MRI phantoms with ground truth for all 80 catalogue structures.

A phantom is a small body (head, torso, arms, legs; about 13 x 7 x 25 cm)
built from ellipsoids in millimetres. The structure tables below are written
in a frame whose x points to the patient's **left** (as DICOM's LPS x does;
anterior = +y, superior = +z): ``_left`` structures at +x, the liver at -x.
The volume's affine is RAS+, whose x points to the patient's right, so the
generator maps table x to world -x (:data:`_TABLE_TO_RAS`): in world
coordinates every ``_left`` structure lies at -x, on the patient's left, and
the liver at +x. Every voxel gets one *region*: air, subcutaneous fat,
visceral (torso) fat, limb muscle filler, head tissue or one named structure;
later (smaller) structures overwrite earlier ones, so the image and the truth
always agree. Per case the generator draws size/position jitter, a random
MRI-like contrast (a random intensity per region, T1-like or inverted
T2-like), partial-volume blur, a smooth multiplicative bias field, Gaussian
noise, a random orientation (axis permutation and flips), random anisotropic
spacing and an optional random field of view in z.

Seeds: training uses :data:`TRAIN_SEEDS` (0 .. 999_999). :data:`HELDOUT_SEEDS`
(10_000_000 ..) is the validation set: never trained on, but used to compare
and pick candidate weights. :data:`TEST_SEEDS` (30_000_000 ..) is the test set:
never trained on and never used to pick anything; it is evaluated only on
weights already picked (``tests/test_demo_dice.py``). SYNTHETIC DATA - the
models trained on it are demo models, NOT FOR CLINICAL USE.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from nibabel.orientations import axcodes2ornt
from scipy import ndimage

from serve.catalogue import load_catalogue
from serve.imaging.volume import Volume

TRAIN_SEEDS = range(0, 1_000_000)
HELDOUT_SEEDS = tuple(range(10_000_000, 10_000_008))
#: the untouched test set: evaluate only weights already picked (on HELDOUT_SEEDS), never to pick them
TEST_SEEDS = tuple(range(30_000_000, 30_000_004))

# region ids below 100 are unlabelled/coarse tissue; structures use 100 + global id
AIR, SUBCUT, TORSO_FAT, LIMB_MUSCLE, HEAD_TISSUE = 0, 1, 2, 3, 4
_STRUCT = 100

# (name, [(cx, cy, cz, rx, ry, rz), ...]) in the tables' frame (x toward the patient's left); a
# "_left" entry is mirrored to "_right" at -x; names in _BOTH are painted on both sides with one label.
_SIDED = [
    ("lung", [(20, 2, 139, 16, 22, 11)]),
    ("kidney", [(19, -15, 110, 5, 5, 9)]),
    ("adrenal_gland", [(14, -13, 123, 2.5, 2.5, 3.5)]),
    ("iliac_artery", [(9, -4, 82, 2.2, 2.2, 8)]),
    ("iliac_vena", [(12, -9, 82, 2.2, 2.2, 8)]),
    ("humerus", [(56, 0, 126, 3.2, 3.2, 20)]),
    ("scapula", [(26, -20, 138, 9, 2, 9)]),
    ("clavicula", [(23, 15, 148, 13, 2.5, 2.5)]),
    ("femur", [(20, 0, 33, 4.5, 4.5, 24)]),
    ("hip", [(22, -6, 68, 9, 8, 7)]),
    ("gluteus_maximus", [(18, -24, 58, 10, 6, 9)]),
    ("gluteus_medius", [(28, -14, 74, 6, 6, 6)]),
    ("gluteus_minimus", [(30, -4, 74, 3.5, 4, 4)]),
    ("autochthon", [(8, -26, 110, 4, 4, 36)]),
    ("iliopsoas", [(12, -9, 96, 4, 4, 16)]),
    ("quadriceps_femoris", [(20, 9, 33, 9, 5, 22)]),
    ("thigh_medial_compartment", [(11, -2, 33, 4, 6, 20)]),
    ("thigh_posterior_compartment", [(21, -9, 33, 8, 4, 20)]),
    ("sartorius", [(12, 8, 38, 2.5, 2.5, 18)]),
]
_BOTH = [
    ("deltoid", [(56, 0, 146, 7, 7, 5)]),
    ("supraspinatus", [(30, -22, 149, 8, 3, 2.5)]),
    ("infraspinatus", [(26, -23.5, 136, 8, 1.8, 6)]),
    ("subscapularis", [(26, -16.5, 136, 8, 1.8, 6)]),
    ("coracobrachial", [(53.5, 2.5, 130, 2.2, 2.2, 8)]),
    ("trapezius", [(14, -29, 147, 11, 3, 4)]),
    ("pectoralis_minor", [(22, 24, 138, 8, 2.5, 6)]),
    ("serratus_anterior", [(38, 2, 130, 3, 10, 8)]),
    ("teres_major", [(35, -15, 128, 5, 3, 3)]),
    ("triceps_brachii", [(56, -3.5, 110, 4, 2, 13)]),
    ("patella", [(20, 8.5, 8, 4, 2, 4)]),
    ("tibia", [(20, 2, -26, 3.5, 3.5, 24)]),
    ("fibula", [(26, -4, -26, 2, 2, 21)]),
    ("tarsal", [(20, 0, -60, 5, 6, 4)]),
    ("metatarsal", [(20, 14, -64, 5, 7, 2.5)]),
    ("phalanges_feet", [(20, 26, -65, 5, 4, 2)]),
    ("ulna", [(58, -2, 76, 2, 2, 12)]),
    ("radius", [(53, 2, 76, 2, 2, 12)]),
]
_MIDLINE = [
    ("liver", [(-19, 5, 126, 19, 18, 12)]),
    ("spleen", [(26, -8, 126, 8, 6, 9)]),
    ("stomach", [(16, 12, 127, 10, 8, 8)]),
    ("gallbladder", [(-14, 14, 116, 3, 3, 5)]),
    ("pancreas", [(3, 0, 117, 13, 3, 3)]),
    ("esophagus", [(1, -9, 142, 2.5, 2.5, 10)]),
    ("small_bowel", [(0, 12, 96, 18, 10, 7)]),
    ("duodenum", [(-7, 2, 111, 6, 3, 3)]),
    ("colon", [(0, 14, 84, 22, 8, 4.5)]),
    ("urinary_bladder", [(0, 12, 67, 8, 7, 6)]),
    ("prostate", [(0, 4, 59, 3.5, 3, 3)]),
    ("sacrum", [(0, -20, 68, 8, 5, 8)]),
    ("vertebrae", [(0, -17, z, 5.5, 5, 3.5) for z in range(82, 152, 10)]),
    ("intervertebral_discs", [(0, -17, z + 5, 5, 4.5, 1.6) for z in range(82, 142, 10)]),
    ("spinal_cord", [(0, -25, 112, 2, 2, 38)]),
    ("heart", [(5, 8, 137, 10, 9, 8)]),
    ("aorta", [(5, -9, 116, 3, 3, 28)]),
    ("inferior_vena_cava", [(-6, -6, 114, 3, 3, 24)]),
    ("portal_vein_and_splenic_vein", [(3, 3, 121, 11, 2, 2)]),
    ("brain", [(0, -2, 178, 16, 18, 14)]),
    ("face", [(0, 20, 172, 13, 4, 12)]),
    ("skeletal_muscle", []),      # the union of muscle regions (coarse class)
    ("subcutaneous_fat", []),     # a shell under the skin
    ("torso_fat", []),            # torso interior not otherwise claimed
]

# body parts: (region filling the inside, [(cx, cy, cz, rx, ry, rz, kind)]), kind "cyl" = elliptic cylinder in z
_BODY = [
    (TORSO_FAT, [(0, 0, 104, 45, 35, 49, "cyl")]),
    (HEAD_TISSUE, [(0, 0, 156, 10, 10, 6, "cyl"), (0, 0, 175, 21, 24, 22, "ell")]),
    (LIMB_MUSCLE, [(s * 56, 0, 107, 8.5, 8.5, 45, "cyl") for s in (1, -1)]
     + [(s * 20, 0, 31, 15, 15, 31, "cyl") for s in (1, -1)]
     + [(s * 21, 0, -29, 10, 10, 29, "cyl") for s in (1, -1)]
     + [(s * 20, 11, -63, 7, 20, 5, "box") for s in (1, -1)]),
]
_SKIN_MM = 3.5
BODY_EXTENT_MM = ((-66.0, 66.0), (-36.0, 36.0), (-70.0, 198.0))

#: the tables' frame -> RAS+ world millimetres: the tables' x points to the patient's left, RAS+ x to the right
_TABLE_TO_RAS = np.diag([-1.0, 1.0, 1.0, 1.0])


@lru_cache(maxsize=1)
def structure_shapes() -> tuple[tuple[str, tuple[tuple[float, ...], ...]], ...]:
    """Every named structure with its ellipsoids in the tables' frame (``_left`` at +x there, which is the
    patient's left), largest first so small ones stay visible."""
    out = []
    for base, ells in _SIDED:
        out.append((f"{base}_left", tuple(ells)))
        out.append((f"{base}_right", tuple((-e[0],) + tuple(e[1:]) for e in ells)))
    for name, ells in _BOTH:
        out.append((name, tuple(ells) + tuple((-e[0],) + tuple(e[1:]) for e in ells)))
    for name, ells in _MIDLINE:
        out.append((name, tuple(ells)))
    vol = {n: sum(e[3] * e[4] * e[5] for e in ells) for n, ells in out}
    return tuple(sorted(out, key=lambda t: -vol[t[0]]))


def _muscle_names() -> set[str]:
    cat = load_catalogue()
    bones = {"humerus", "scapula", "clavicula", "femur", "hip", "brain"}
    named = {n for n in cat.submodel("muscles").labels if n.rsplit("_", 1)[0] not in bones and n != "brain"}
    return named | set(cat.submodel("thigh_shoulder_muscles").labels)


@dataclass
class Phantom:
    """A synthetic volume and its ground truth on the same grid."""

    volume: Volume
    truth: np.ndarray                       # uint8 global ids (catalogue precedence applied)
    truth_per_model: dict[str, np.ndarray]  # sub-model -> uint8 global ids (lossless per structure)
    seed: int
    axcodes: str


def random_axcodes(rng: np.random.Generator) -> str:
    """A random voxel axis order with random flips, e.g. "PIR"."""
    perm = rng.permutation(3)
    pairs = [("L", "R"), ("P", "A"), ("I", "S")]
    return "".join(pairs[p][int(rng.integers(2))] for p in perm)


def _affine(axcodes: str, spacing_world, shape, origin_world) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = 0
    for i, (ax, flip) in enumerate(axcodes2ornt(axcodes)):
        aff[int(ax), i] = flip * float(spacing_world[int(ax)])
    # origin: the world position of voxel (0,0,0) = lowest corner along + axes, highest along - axes
    ext = (np.asarray(shape) - 1)
    corner = np.asarray(origin_world, dtype=float).copy()
    for i in range(3):
        col = aff[:3, i]
        if col.sum() < 0:
            corner += -col * ext[i]
    aff[:3, 3] = corner
    return aff


def _world(aff: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ijk = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    a = aff.astype(np.float32)
    return tuple(a[r, 0] * ijk[0] + a[r, 1] * ijk[1] + a[r, 2] * ijk[2] + a[r, 3] for r in range(3))


def _inside(xyz, e, kind: str = "ell") -> np.ndarray:
    x, y, z = xyz
    cx, cy, cz, rx, ry, rz = e[:6]
    if kind == "box":
        return (abs(x - cx) <= rx) & (abs(y - cy) <= ry) & (abs(z - cz) <= rz)
    r = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    if kind == "cyl":
        return (r <= 1) & (abs(z - cz) <= rz)
    return r + ((z - cz) / rz) ** 2 <= 1


def make_phantom(seed: int, *, spacing_mm=None, axcodes: str | None = None, full_fov: bool = False,
                 contrast: str | None = None, noise: float | None = None) -> Phantom:
    """One phantom; every random choice comes from ``seed`` unless given.

    Args:
        seed: Seed of every random choice (geometry, contrast, noise).
        spacing_mm: The (x, y, z) world spacing (default random 1.2-3 mm, anisotropic).
        axcodes: The voxel axis order in RAS+ letters (default random, e.g. "LPS").
        full_fov: Keep the whole body (default: a random field of view in z).
        contrast: "t1" (fat bright) or "t2" (inverted) (default random).
        noise: Gaussian noise as a share of the intensity range (default random 1-5 %).

    Returns:
        The phantom: volume (RAS+ affine), its truth and the truth per sub-model on the same grid.
    """
    rng = np.random.default_rng(seed)
    cat = load_catalogue()
    ids = cat.structure_ids
    spacing = np.asarray(spacing_mm if spacing_mm is not None else rng.uniform(1.2, 3.0, 3), dtype=float)
    if spacing.size == 1:
        spacing = np.repeat(spacing, 3)
    # The grid is drawn in the tables' frame, whose L/R letters are RAS+'s swapped. So a seed gives the
    # voxels and truth it gave before left and right were fixed; only the affine's x row changed sign.
    frame_codes = _swap_left_right(axcodes) if axcodes else random_axcodes(rng)
    contrast = contrast or ("t1" if rng.random() < 0.5 else "t2")
    scale = rng.uniform(0.92, 1.08, 3)

    lo = np.array([b[0] for b in BODY_EXTENT_MM]) * scale
    hi = np.array([b[1] for b in BODY_EXTENT_MM]) * scale
    if not full_fov:  # random field of view in z (at least 110 mm) plus random margins
        length = rng.uniform(110, hi[2] - lo[2])
        z0 = rng.uniform(lo[2], hi[2] - length)
        lo[2], hi[2] = z0, z0 + length
    lo -= rng.uniform(0, 6, 3)
    hi += rng.uniform(0, 6, 3)
    shape_world = np.maximum(np.round((hi - lo) / spacing).astype(int) + 1, 2)

    ornt = axcodes2ornt(frame_codes)
    shape = tuple(int(shape_world[int(ax)]) for ax, _ in ornt)
    frame_aff = _affine(frame_codes, spacing, shape, lo)
    aff = _TABLE_TO_RAS @ frame_aff
    xyz = tuple(c / s for c, s in zip(_world(frame_aff, shape), scale))  # the tables' coordinates

    region = np.zeros(shape, np.int16)
    for fill, parts in _BODY:
        for p in parts:
            region[_inside(xyz, p, p[6])] = fill
    body = region > 0
    depth = ndimage.distance_transform_edt(body, sampling=np.linalg.norm(aff[:3, :3], axis=0))
    region[body & (depth <= _SKIN_MM)] = SUBCUT
    interior = body & (depth > _SKIN_MM)
    for name, ells in structure_shapes():
        if not ells:
            continue
        jit = rng.normal(0, 1.0, 3)
        rs = rng.uniform(0.88, 1.12)
        m = np.zeros(shape, bool)
        for e in ells:
            e2 = (e[0] + jit[0], e[1] + jit[1], e[2] + jit[2], e[3] * rs, e[4] * rs, e[5] * rs)
            m |= _inside(xyz, e2)
        region[m & interior] = _STRUCT + ids[name]

    truth, per_model = _truth(region)
    data = _render(region, rng, contrast, aff, noise)
    vol = Volume(data, aff, "nifti")
    return Phantom(vol, truth, per_model, seed, _swap_left_right(frame_codes))


def _swap_left_right(axcodes: str) -> str:
    """The same axis order in the tables' frame and RAS+: their x axes point opposite ways."""
    return axcodes.translate(str.maketrans("LR", "RL"))


def _truth(region: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    cat = load_catalogue()
    ids = cat.structure_ids
    muscle_ids = [ids[n] for n in _muscle_names()]
    structs = np.where(region >= _STRUCT, region - _STRUCT, 0).astype(np.uint8)
    truth = structs.copy()
    muscle = (region == LIMB_MUSCLE) | np.isin(structs, muscle_ids)
    coarse = {"subcutaneous_fat": region == SUBCUT, "torso_fat": region == TORSO_FAT, "skeletal_muscle": muscle}
    for n in ("subcutaneous_fat", "torso_fat"):
        truth[coarse[n]] = ids[n]
    truth[region == LIMB_MUSCLE] = ids["skeletal_muscle"]
    per_model = {}
    for sm in cat.submodels:
        out = np.zeros(region.shape, np.uint8)
        for n in sm.labels:
            out[coarse[n] if n in coarse else structs == ids[n]] = ids[n]
        per_model[sm.name] = out
    return truth, per_model


def _render(region: np.ndarray, rng: np.random.Generator, contrast: str, aff: np.ndarray,
            noise: float | None) -> np.ndarray:
    """Random MRI-like intensities per region, partial-volume blur, bias field and noise."""
    fat, muscle = (rng.uniform(0.75, 1.0), rng.uniform(0.25, 0.45))
    if contrast == "t2":
        fat, muscle = rng.uniform(0.45, 0.7), rng.uniform(0.08, 0.25)
    lut = np.zeros(_STRUCT + 81, np.float32)
    lut[AIR] = rng.uniform(0.0, 0.04)
    lut[SUBCUT] = fat
    lut[TORSO_FAT] = fat * rng.uniform(0.85, 1.0)
    lut[LIMB_MUSCLE] = muscle
    lut[HEAD_TISSUE] = rng.uniform(0.3, 0.6)
    muscle_ids = {load_catalogue().structure_ids[n] for n in _muscle_names()}
    for gid in range(1, 81):
        if gid in muscle_ids:  # named muscles share muscle contrast with a small offset
            lut[_STRUCT + gid] = muscle + rng.uniform(-0.12, 0.12)
        else:
            lut[_STRUCT + gid] = rng.uniform(0.05, 1.0)
    img = lut[np.clip(region, 0, _STRUCT + 80)]
    vox = np.linalg.norm(aff[:3, :3], axis=0)
    img = ndimage.gaussian_filter(img, sigma=0.6 / vox * 1.5)
    # smooth multiplicative bias field: low-order random polynomial over the volume
    g = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in img.shape], indexing="ij")
    c = rng.normal(0, 0.15, 6)
    bias = np.exp(c[0] * g[0] + c[1] * g[1] + c[2] * g[2] + c[3] * g[0] * g[1] + c[4] * g[2] ** 2 + c[5] * g[0] ** 2)
    sd = noise if noise is not None else rng.uniform(0.01, 0.05)
    img = img * bias + rng.normal(0, sd, img.shape).astype(np.float32)
    return np.ascontiguousarray((img * rng.uniform(200, 2000)).astype(np.float32))


#: seeds of the demo phantoms: outside the training range, the held-out set and the test set
DEMO_SEED_BASE = 20_000_000


def demo_volume(seed: int = 9):
    """The phantom that ``mriseg demo`` segments, from a seed range that training and the held-out
    test set never use. Seed 9: a chest-to-thigh field of view with 68 of the 80 structures, random
    orientation, spacing and contrast, small enough (0.46 M voxels at 1.5 mm) for a quick demo."""
    return make_phantom(DEMO_SEED_BASE + seed).volume
