"""The embedded "scenes" set: procedurally ray-cast rooms with seg, depth and normals.

A pinhole camera (random height, pitch, yaw, field of view) looks into a room: a floor, a back
wall and two side walls, an optional rug on the floor and painting on the back wall, and 2–5
primitives standing on the floor (spheres, axis-aligned boxes, vertical cylinders). Every pixel
ray is intersected analytically, giving

* ``depth``: z-depth in metres (camera frame), 0 where the view grazes the surface (invalid);
* ``normals``: unit surface normals in the camera frame (x right, y down, z forward), facing
  the camera, 0 where the depth is invalid;
* ``label``: the class of the hit surface (:data:`SCENE_CLASSES`);
* ``image``: RGB in [0, 1] from Lambertian shading under a directional light with cast shadows,
  per-class albedo mixed with a random per-instance colour (so class colour ranges overlap),
  per-class procedural textures, distance fall-off, white-balance jitter and sensor noise.

Everything is a function of the seed (numpy ``default_rng``), so samples are reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import MultiTaskDataset, image_to_tensor
from .registry import register_dataset

__all__ = [
    "SCENE_CLASSES",
    "SCENE_OBJECT_CLASSES",
    "SCENE_ATTRIBUTES",
    "render_scene",
    "ScenesDataset",
]

#: Semantic classes of the scenes set; the label map holds their indices.
SCENE_CLASSES: tuple[str, ...] = ("floor", "wall", "rug", "painting", "box", "sphere", "cylinder")
FLOOR, WALL, RUG, PAINTING, BOX, SPHERE, CYLINDER = range(7)
#: Classes of the optional "classify" task: the object class covering most pixels.
SCENE_OBJECT_CLASSES: tuple[str, ...] = ("box", "sphere", "cylinder")
#: Attributes of the optional "attributes" task: class visible on at least 0.5 % of the pixels.
SCENE_ATTRIBUTES: tuple[str, ...] = ("rug", "painting", "box", "sphere", "cylinder")

_BASE_ALBEDO = np.array(
    [
        [0.55, 0.40, 0.28],  # floor
        [0.72, 0.70, 0.66],  # wall
        [0.60, 0.25, 0.28],  # rug
        [0.50, 0.50, 0.50],  # painting
        [0.60, 0.46, 0.32],  # box
        [0.35, 0.45, 0.70],  # sphere
        [0.50, 0.60, 0.38],  # cylinder
    ],
    dtype=np.float32,
)
_EPS = 1e-4
_INF = np.float32(np.inf)


@dataclass
class _Prim:
    kind: int  # BOX / SPHERE / CYLINDER
    params: tuple[Any, ...]
    albedo: np.ndarray
    tex: float  # texture frequency / phase parameter
    lo: np.ndarray  # world-frame bounding box
    hi: np.ndarray


# ----------------------------------------------------------------------------- intersections
# Rays are given as component triples (x, y, z) of scalars or (N,) arrays: o + t d.
Vec = tuple[Any, Any, Any]


def _sphere(o: Vec, d: Vec, c: np.ndarray, r: float) -> np.ndarray:
    """Nearest t > eps of the rays with a sphere (inf on a miss)."""
    ox, oy, oz = o[0] - c[0], o[1] - c[1], o[2] - c[2]
    a = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    hb = ox * d[0] + oy * d[1] + oz * d[2]
    cc = ox * ox + oy * oy + oz * oz - r * r
    disc = hb * hb - a * cc
    sq = np.sqrt(np.maximum(disc, 0.0))
    t0 = (-hb - sq) / a
    t1 = (-hb + sq) / a
    t = np.where(t0 > _EPS, t0, np.where(t1 > _EPS, t1, _INF))
    return np.where(disc >= 0, t, _INF)


def _box(o: Vec, d: Vec, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slab test with an axis-aligned box: (nearest t > eps or inf, index of the entry axis)."""
    tn = tf = None
    axis = None
    for k in range(3):
        inv = 1.0 / np.where(d[k] == 0, 1e-30, d[k])  # no 0 * inf = nan on slab planes
        t1 = (lo[k] - o[k]) * inv
        t2 = (hi[k] - o[k]) * inv
        lo_k = np.minimum(t1, t2)
        hi_k = np.maximum(t1, t2)
        if tn is None:
            tn, tf, axis = lo_k, hi_k, np.zeros(np.shape(lo_k), np.int64)
        else:
            axis = np.where(lo_k > tn, k, axis)
            tn, tf = np.maximum(tn, lo_k), np.minimum(tf, hi_k)
    t = np.where(tn > _EPS, tn, tf)
    hit = (tf >= tn) & (t > _EPS)
    return np.where(hit, t, _INF), axis


def _cylinder(o: Vec, d: Vec, cx: float, cz: float, r: float, y0: float, y1: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertical cylinder (axis ‖ Y, y in [y0, y1], top cap at y0): (nearest t or inf, hit-the-cap mask)."""
    ox, oy, oz = o[0] - cx, o[1], o[2] - cz
    dx, dy, dz = d
    a = np.maximum(dx * dx + dz * dz, 1e-12)
    hb = ox * dx + oz * dz
    cc = ox * ox + oz * oz - r * r
    disc = hb * hb - a * cc
    sq = np.sqrt(np.maximum(disc, 0.0))
    ts = _INF
    for t in ((-hb - sq) / a, (-hb + sq) / a):
        y = oy + t * dy
        ok = (disc >= 0) & (t > _EPS) & (y >= y0) & (y <= y1)
        ts = np.where(ok & (t < ts), t, ts)
    with np.errstate(divide="ignore", invalid="ignore"):
        tc = (y0 - oy) / dy
    px = ox + tc * dx
    pz = oz + tc * dz
    capok = (tc > _EPS) & (px * px + pz * pz <= r * r)
    tc = np.where(capok, tc, _INF)
    return np.minimum(ts, tc), tc < ts


def _hash01(x: np.ndarray, salt: float) -> np.ndarray:
    """Deterministic pseudo-random value in [0, 1) per integer cell."""
    v = np.sin(x * 12.9898 + salt * 78.233) * 43758.5453
    return v - np.floor(v)


# ----------------------------------------------------------------------------- scene sampling
def _rotation(pitch: float, yaw: float) -> np.ndarray:
    """Camera -> world rotation: pitch down by ``pitch`` (about x), then yaw (about y)."""
    cp, sp = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    r_pitch = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
    r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return r_yaw @ r_pitch


def _instance_albedo(rng: np.random.Generator, cls: int) -> np.ndarray:
    mix = rng.uniform(0.35, 0.75)
    return ((1 - mix) * _BASE_ALBEDO[cls] + mix * rng.uniform(0.1, 0.95, 3)).astype(np.float32)


def _sample_objects(
    rng: np.random.Generator, h: float, depth: float, left: float, right: float, half_fov: float
) -> list[_Prim]:
    """2–5 non-overlapping primitives standing on the floor (y = h), inside the room and the view."""
    prims: list[_Prim] = []
    foot: list[tuple[float, float, float]] = []
    n = int(rng.integers(2, 6))
    for _ in range(n):
        kind = int(rng.choice([BOX, SPHERE, CYLINDER]))
        if kind == SPHERE:
            r = rng.uniform(0.3, 0.7)
            rad = r
        elif kind == BOX:
            ax, ay, az = rng.uniform(0.2, 0.6), rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.6)
            rad = float(np.hypot(ax, az))
        else:
            r, height = rng.uniform(0.15, 0.45), rng.uniform(0.4, 1.8)
            rad = r
        for _try in range(20):
            z = rng.uniform(2.2, depth - rad - 0.2)
            span = min(z * np.tan(half_fov) * 0.9, 5.0)
            x = rng.uniform(max(-span, -left + rad + 0.05), min(span, right - rad - 0.05))
            if all(np.hypot(x - fx, z - fz) > rad + fr + 0.05 for fx, fz, fr in foot):
                break
        else:
            continue
        foot.append((x, z, rad))
        albedo = _instance_albedo(rng, kind)
        tex = rng.uniform(0.0, 1.0)
        if kind == SPHERE:
            c = np.array([x, h - r, z], np.float32)
            prims.append(_Prim(SPHERE, (c, r), albedo, tex, c - r, c + r))
        elif kind == BOX:
            lo = np.array([x - ax, h - 2 * ay, z - az], np.float32)
            hi = np.array([x + ax, h, z + az], np.float32)
            prims.append(_Prim(BOX, (lo, hi), albedo, tex, lo, hi))
        else:
            lo = np.array([x - r, h - height, z - r], np.float32)
            hi = np.array([x + r, h, z + r], np.float32)
            prims.append(_Prim(CYLINDER, (x, z, r, h - height, h), albedo, tex, lo, hi))
    return prims


def _intersect(p: _Prim, o: Vec, d: Vec) -> np.ndarray:
    if p.kind == SPHERE:
        return _sphere(o, d, *p.params)
    if p.kind == BOX:
        return _box(o, d, *p.params)[0]
    return _cylinder(o, d, *p.params)[0]


def _screen_rect(p: _Prim, R: np.ndarray, f: float, cx: float, cy: float, H: int, W: int) -> tuple[slice, slice]:
    """Pixel rows/cols covering the projection of the primitive's bounding box (whole image if unsure)."""
    corners = np.stack(np.meshgrid(*zip(p.lo, p.hi), indexing="ij"), -1).reshape(-1, 3) @ R  # camera frame
    z = corners[:, 2]
    if (z < 0.05).any():
        return slice(0, H), slice(0, W)
    u = f * corners[:, 0] / z + cx
    v = f * corners[:, 1] / z + cy
    u0, u1 = int(np.clip(np.floor(u.min()) - 1, 0, W)), int(np.clip(np.ceil(u.max()) + 1, 0, W))
    v0, v1 = int(np.clip(np.floor(v.min()) - 1, 0, H)), int(np.clip(np.ceil(v.max()) + 1, 0, H))
    return slice(v0, v1), slice(u0, u1)


# ----------------------------------------------------------------------------- rendering
def render_scene(
    seed: int,
    size: tuple[int, int] = (96, 128),
    *,
    grazing_cos: float = 0.05,
    noise: float = 0.015,
) -> dict[str, np.ndarray]:
    """Render one scene deterministically from ``seed``.

    Returns a dict of numpy arrays (H, W = ``size``):
    ``image`` (H,W,3) float32 in [0,1]; ``depth`` (H,W) float32 metres, 0 = invalid;
    ``normals`` (H,W,3) float32 unit camera-frame normals, 0 = invalid; ``label`` (H,W) uint8
    indices into :data:`SCENE_CLASSES`; ``K`` (3,3) intrinsics (pixel centres at +0.5);
    ``up`` (3,) the world up vector in the camera frame; ``camera_height`` () metres above the
    floor (the floor is the plane up·X = −camera_height); ``light`` (3,) camera-frame direction
    towards the light.
    """
    H, W = int(size[0]), int(size[1])
    if H < 1 or W < 1:
        raise ValueError(f"size must be positive, got {size}")
    rng = np.random.default_rng(seed)

    # camera
    half_fov = np.deg2rad(rng.uniform(55.0, 70.0)) / 2  # across the longer image side
    f = float((max(H, W) / 2) / np.tan(half_fov))
    cx, cy = W / 2, H / 2
    h = rng.uniform(1.2, 1.8)
    R = _rotation(np.deg2rad(rng.uniform(8.0, 25.0)), np.deg2rad(rng.uniform(-15.0, 15.0)))
    # room and decorations (world: X right, Y down, Z forward; camera at the origin)
    depth_wall = rng.uniform(6.0, 9.5)
    left, right = rng.uniform(2.5, 4.5), rng.uniform(2.5, 4.5)
    rug = None
    if rng.random() < 0.6:
        rz, rx = rng.uniform(2.0, depth_wall - 2.5), rng.uniform(-1.5, 1.5)
        rug = (rx - rng.uniform(0.5, 1.5), rx + rng.uniform(0.5, 1.5), rz, rz + rng.uniform(1.0, 2.5))
    painting = None
    if rng.random() < 0.6:
        px, py = rng.uniform(-2.0, 2.0), h - rng.uniform(1.2, 2.2)
        pw, ph = rng.uniform(0.4, 1.0), rng.uniform(0.3, 0.6)
        painting = (px - pw, px + pw, py - ph, py + ph)
    prims = _sample_objects(rng, h, depth_wall, left, right, float(np.arctan(W / 2 / f)))
    albedo_cls = np.stack([_instance_albedo(rng, c) for c in range(4)])  # floor, wall, rug, painting
    albedo_rug2 = _instance_albedo(rng, RUG)
    paint_cols = rng.uniform(0.05, 0.95, (3, 3)).astype(np.float32)
    floor_tiles = rng.random() < 0.5
    tile = rng.uniform(0.25, 0.6)
    rug_angle, rug_period = rng.uniform(0, np.pi), rng.uniform(0.15, 0.4)
    light = np.array([rng.uniform(-0.7, 0.7), -1.0, rng.uniform(-0.9, 0.3)])
    light /= np.linalg.norm(light)
    ambient = rng.uniform(0.25, 0.45)
    intensity = rng.uniform(0.8, 1.1)
    white = 1.0 + rng.normal(0.0, 0.05, 3)
    salt = rng.uniform(0, 100)

    # primary rays (camera-frame direction has z = 1, so the ray parameter t is the z-depth)
    u = (np.arange(W, dtype=np.float32) + 0.5 - cx) / f
    v = (np.arange(H, dtype=np.float32) + 0.5 - cy) / f
    uc = np.broadcast_to(u[None, :], (H, W)).ravel()
    vc = np.broadcast_to(v[:, None], (H, W)).ravel()
    Rf = R.astype(np.float32)
    dx, dy, dz = ((Rf[i, 0] * uc + Rf[i, 1] * vc + Rf[i, 2]).astype(np.float32) for i in range(3))
    d = (dx, dy, dz)
    n_pix = H * W
    origin0 = (0.0, 0.0, 0.0)

    with np.errstate(divide="ignore"):
        t_floor = np.where(dy > 0, h / dy, _INF).astype(np.float32)
        t_side = np.where(dx > 0, right / dx, np.where(dx < 0, -left / dx, _INF)).astype(np.float32)
    t_back = (depth_wall / dz).astype(np.float32)  # dz > 0 everywhere: pitch + half vertical fov < 90 deg
    t = np.minimum(np.minimum(t_floor, t_back), t_side)
    is_floor = t == t_floor
    label = np.where(is_floor, FLOOR, WALL).astype(np.int64)
    inst = np.full(n_pix, -1, np.int64)
    side = (t == t_side) & ~is_floor
    nx = np.where(side, np.where(dx > 0, -1.0, 1.0), 0.0).astype(np.float32)
    ny = np.where(is_floor, -1.0, 0.0).astype(np.float32)
    nz = np.where(~is_floor & ~side, -1.0, 0.0).astype(np.float32)

    t2, label2, inst2 = t.reshape(H, W), label.reshape(H, W), inst.reshape(H, W)
    d2 = tuple(c.reshape(H, W) for c in d)
    n2 = tuple(c.reshape(H, W) for c in (nx, ny, nz))
    for k, p in enumerate(prims):
        rows, cols = _screen_rect(p, R, f, cx, cy, H, W)
        if rows.start >= rows.stop or cols.start >= cols.stop:
            continue
        db = tuple(c[rows, cols] for c in d2)
        if p.kind == SPHERE:
            tk = _sphere(origin0, db, *p.params)
        elif p.kind == BOX:
            tk, axis = _box(origin0, db, *p.params)
        else:
            tk, cap = _cylinder(origin0, db, *p.params)
        tb = t2[rows, cols]  # views: writing through them updates t, label, inst, normals
        hit = tk < tb
        if not hit.any():
            continue
        th = tk[hit]
        tb[hit] = th
        label2[rows, cols][hit] = p.kind
        inst2[rows, cols][hit] = k
        bx, by, bz = (n[rows, cols] for n in n2)
        hx, hy, hz = th * db[0][hit], th * db[1][hit], th * db[2][hit]
        if p.kind == SPHERE:
            c, r = p.params
            bx[hit], by[hit], bz[hit] = (hx - c[0]) / r, (hy - c[1]) / r, (hz - c[2]) / r
        elif p.kind == BOX:
            ax = axis[hit]
            for i, n_i in enumerate((bx, by, bz)):
                n_i[hit] = np.where(ax == i, -np.sign(db[i][hit]), 0.0)
        else:
            x0, z0, r = p.params[:3]
            ch = cap[hit]
            bx[hit] = np.where(ch, 0.0, (hx - x0) / r)
            by[hit] = np.where(ch, -1.0, 0.0)
            bz[hit] = np.where(ch, 0.0, (hz - z0) / r)

    X, Y, Z = t * dx, t * dy, t * dz  # world-frame hit points (camera at the origin)
    if rug is not None:
        on = (label == FLOOR) & (X > rug[0]) & (X < rug[1]) & (Z > rug[2]) & (Z < rug[3])
        label[on] = RUG
    if painting is not None:
        on = (label == WALL) & (nz < -0.5) & (X > painting[0]) & (X < painting[1])
        on &= (Y > painting[2]) & (Y < painting[3])
        label[on] = PAINTING

    # albedo: a colour per surface (table lookup) times a scalar procedural texture factor
    colours = np.concatenate([albedo_cls, albedo_rug2[None], np.stack([p.albedo for p in prims] or [albedo_cls[0]])])
    cid = np.minimum(label, 3)
    cid = np.where(inst >= 0, 5 + inst, cid)
    fac = np.ones(n_pix, np.float32)
    m = np.flatnonzero(label == FLOOR)
    if floor_tiles:
        cell = np.floor(X[m] / tile) + np.floor(Z[m] / tile)
        fac[m] = 0.82 + 0.18 * (cell % 2)
    else:
        plank = np.floor(X[m] / (tile * 0.6))
        hp = _hash01(plank, salt)
        fac[m] = 0.8 + 0.25 * hp + 0.06 * np.sin(Z[m] * 9.0 + plank * 3.1 + 4.0 * hp)
    m = np.flatnonzero(label == WALL)
    fac[m] = 1.0 + 0.05 * np.sin(3.1 * X[m] + 1.7 * Z[m] + salt) * np.sin(2.3 * Y[m])
    m = np.flatnonzero(label == RUG)
    stripe = np.sin((X[m] * np.cos(rug_angle) + Z[m] * np.sin(rug_angle)) * (2 * np.pi / rug_period)) > 0
    cid[m[~stripe]] = 4
    for k, p in enumerate(prims):
        m = np.flatnonzero(inst == k)
        if p.kind == BOX:  # crate planks along Y
            fac[m] = 0.9 + 0.1 * np.sign(np.sin(Y[m] * (12 + 10 * p.tex)))
        elif p.kind == CYLINDER:  # horizontal rings
            fac[m] = 0.85 + 0.15 * np.sign(np.sin(Y[m] * (8 + 12 * p.tex)))
        else:  # soft two-tone ball
            c, r = p.params
            q = (3 * (X[m] - c[0]) + 2 * (Y[m] - c[1])) / r
            fac[m] = 0.85 + 0.15 * np.tanh(4 * np.sin(q + 6 * p.tex))
    alb = colours[cid]
    m = np.flatnonzero(label == PAINTING)
    if m.size:  # framed abstract art: a per-pixel colour
        px_, py_ = X[m], Y[m]
        dist_x = np.minimum(px_ - painting[0], painting[1] - px_)
        frame = np.minimum(dist_x, np.minimum(py_ - painting[2], painting[3] - py_)) < 0.07
        w1 = (0.5 + 0.5 * np.sin(7.0 * px_ + 3.0 * np.sin(5.0 * py_ + salt)))[:, None]
        w2 = (0.5 + 0.5 * np.sin(6.0 * py_ - 4.0 * px_ + salt))[:, None]
        art = np.clip(paint_cols[0] * w1 + paint_cols[1] * (1 - w1) * w2 + paint_cols[2] * 0.3, 0, 1)
        alb[m] = np.where(frame[:, None], np.float32(0.12), art)

    # shading: ambient + Lambert with cast shadows from the primitives, distance fall-off
    lx, ly, lz = (float(c) for c in light)
    lam = np.maximum(nx * lx + ny * ly + nz * lz, 0.0)
    lit = np.flatnonzero(lam > 0)
    if prims and lit.size:
        # cull with each primitive's bounding sphere, seen along the light direction
        e1 = np.cross(light, [1.0, 0.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(light, e1)
        (a1, a2, a3), (b1, b2, b3) = e1.tolist(), e2.tolist()
        px, py, pz = X[lit] + 1e-3 * nx[lit], Y[lit] + 1e-3 * ny[lit], Z[lit] + 1e-3 * nz[lit]
        pa = px * a1 + py * a2 + pz * a3
        pb = px * b1 + py * b2 + pz * b3
        ps = px * lx + py * ly + pz * lz
        shadow = np.zeros(lit.size, bool)
        for p in prims:
            c, rho = (p.lo + p.hi).astype(np.float64) / 2, float(np.linalg.norm(p.hi - p.lo)) / 2
            ca, cb, cs = float(c @ e1), float(c @ e2), float(c @ light)
            near = ((pa - ca) ** 2 + (pb - cb) ** 2 <= rho * rho) & (ps < cs + rho) & ~shadow
            if near.any():
                sel = np.flatnonzero(near)
                shadow[sel] = _intersect(p, (px[sel], py[sel], pz[sel]), (lx, ly, lz)) < _INF
        lam[lit[shadow]] = 0.0
    shade = (ambient + (1 - ambient) * intensity * lam) * np.exp(-0.04 * t) * fac
    img = alb * shade[:, None] * white.astype(np.float32)
    img = np.sqrt(np.clip(img, 0.0, 1.0))  # display gamma 2
    img += (rng.random(img.shape, dtype=np.float32) - 0.5) * np.float32(noise * 12**0.5)  # uniform, std = noise
    img = np.clip(img, 0.0, 1.0, out=img).reshape(H, W, 3)

    # camera-frame normals (R^T n), validity at grazing angles
    ncx, ncy, ncz = (Rf[0, i] * nx + Rf[1, i] * ny + Rf[2, i] * nz for i in range(3))
    cos_view = np.abs(ncx * uc + ncy * vc + ncz) / np.sqrt(uc * uc + vc * vc + 1.0)
    valid = cos_view >= grazing_cos
    depth = np.where(valid, t, 0.0).astype(np.float32).reshape(H, W)
    normals = np.stack([ncx, ncy, ncz], -1).astype(np.float32)
    normals[~valid] = 0.0

    K = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1]], np.float32)
    return {
        "image": img,
        "depth": depth,
        "normals": normals.reshape(H, W, 3),
        "label": label.astype(np.uint8).reshape(H, W),
        "K": K,
        "up": (np.array([0.0, -1.0, 0.0]) @ R).astype(np.float32),
        "camera_height": np.array(h, np.float32),
        "light": (light @ R).astype(np.float32),
    }


def scene_image_targets(label: np.ndarray) -> tuple[int, np.ndarray]:
    """Image-level targets from a label map: (index into :data:`SCENE_OBJECT_CLASSES` of the
    object class covering most pixels, {0,1} float32 vector over :data:`SCENE_ATTRIBUTES`)."""
    counts = np.bincount(label.ravel(), minlength=len(SCENE_CLASSES))
    dominant = int(np.argmax(counts[[BOX, SPHERE, CYLINDER]]))
    present = counts[[RUG, PAINTING, BOX, SPHERE, CYLINDER]] >= 0.005 * label.size
    return dominant, present.astype(np.float32)


_SPLITS = {"train": 0, "val": 1, "test": 2}


@register_dataset("scenes")
class ScenesDataset(MultiTaskDataset):
    """Procedural scenes (no files). Item ``i`` of a split is rendered from (seed, split, i).

    Provides ``seg`` (7 classes, :data:`SCENE_CLASSES`), ``depth`` [1,H,W] (metres, 0 invalid),
    ``normals`` [3,H,W]; optionally ``classify`` (dominant object class, 3) and ``attributes``
    (visible classes, 5) via ``tasks``. ``image`` is [3,H,W], ImageNet-normalised unless
    ``normalize=False``. ``cache=True`` keeps rendered items in memory. ``root`` is accepted
    (and ignored) so that every data set can be built with the same keyword arguments.
    """

    default_tasks: tuple[str, ...] = ("seg", "depth", "normals")

    def __init__(
        self,
        split: str = "train",
        size: tuple[int, int] = (96, 128),
        length: int = 512,
        seed: int = 0,
        tasks: Sequence[str] = ("seg", "depth", "normals"),
        normalize: bool = True,
        cache: bool = False,
        root: Any = None,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        known = {"seg", "depth", "normals", "classify", "attributes"}
        if not tasks or set(tasks) - known:
            raise ValueError(f"tasks must be a non-empty subset of {sorted(known)}, got {list(tasks)}")
        if int(length) < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.split, self.size, self.length, self.seed = split, (int(size[0]), int(size[1])), int(length), int(seed)
        self.task_names = tuple(tasks)
        self.normalize = normalize
        self._cache: dict[int, dict[str, Tensor]] | None = {} if cache else None
        all_tasks: dict[str, dict[str, Any]] = {
            "seg": {"num_classes": len(SCENE_CLASSES)},
            "depth": {},
            "normals": {},
            "classify": {"num_classes": len(SCENE_OBJECT_CLASSES)},
            "attributes": {"num_attributes": len(SCENE_ATTRIBUTES)},
        }
        self.tasks = {k: all_tasks[k] for k in self.task_names}
        self.classes = SCENE_CLASSES

    def __len__(self) -> int:
        return self.length

    def sample_seed(self, index: int) -> int:
        """The :func:`render_scene` seed of item ``index``."""
        ss = np.random.SeedSequence([self.seed, _SPLITS[self.split], self._check_index(index)])
        return int(ss.generate_state(1)[0])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        index = self._check_index(index)
        if self._cache is not None and index in self._cache:
            return dict(self._cache[index])
        s = render_scene(self.sample_seed(index), self.size)
        item = {"image": image_to_tensor(s["image"], self.normalize)}
        if "seg" in self.tasks:
            item["seg"] = torch.from_numpy(s["label"].astype(np.int64))
        if "depth" in self.tasks:
            item["depth"] = torch.from_numpy(s["depth"])[None]
        if "normals" in self.tasks:
            item["normals"] = torch.from_numpy(np.ascontiguousarray(s["normals"].transpose(2, 0, 1)))
        if "classify" in self.tasks or "attributes" in self.tasks:
            dominant, present = scene_image_targets(s["label"])
            if "classify" in self.tasks:
                item["classify"] = torch.tensor(dominant, dtype=torch.int64)
            if "attributes" in self.tasks:
                item["attributes"] = torch.from_numpy(present)
        if self._cache is not None:
            self._cache[index] = item
        return dict(item)
