"""Data: the procedural scenes set (determinism, geometry) and the real loaders on tiny fixtures."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from gatedmtl.data import SCENE_CLASSES, available_datasets, create_dataset, render_scene
from gatedmtl.tasks import create_task

FLOOR, WALL, RUG = SCENE_CLASSES.index("floor"), SCENE_CLASSES.index("wall"), SCENE_CLASSES.index("rug")
NYUD_FRAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "nyud-frames"


def test_registry():
    assert {"scenes", "nyuv2", "cityscapes", "celeba"} <= set(available_datasets())
    with pytest.raises(ValueError, match="scenes"):
        create_dataset("imagenet")


# ----------------------------------------------------------------------------- scenes
def test_render_scene_outputs():
    s = render_scene(3, (48, 64))
    assert s["image"].shape == (48, 64, 3) and s["image"].dtype == np.float32
    assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
    assert s["depth"].shape == (48, 64) and s["normals"].shape == (48, 64, 3)
    assert s["label"].dtype == np.uint8 and s["label"].max() < len(SCENE_CLASSES)
    valid = s["depth"] > 0
    assert valid.mean() > 0.9
    norms = np.linalg.norm(s["normals"], axis=-1)
    np.testing.assert_allclose(norms[valid], 1.0, atol=1e-4)
    assert np.all(norms[~valid] == 0)
    # every valid normal faces the camera
    K_inv = np.linalg.inv(s["K"])
    v, u = np.mgrid[0:48, 0:64]
    rays = np.stack([u + 0.5, v + 0.5, np.ones_like(u)], -1) @ K_inv.T
    assert np.all(np.sum(s["normals"] * rays, -1)[valid] < 0)


def test_scenes_cover_all_classes():
    labels = [render_scene(i, (48, 64))["label"].ravel() for i in range(30)]
    counts = sum(np.bincount(lab, minlength=len(SCENE_CLASSES)) for lab in labels)
    assert len(SCENE_CLASSES) >= 6 and np.all(counts > 0)


def test_render_scene_is_deterministic():
    a, b, c = render_scene(7), render_scene(7), render_scene(8)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["depth"], c["depth"])
    ds1 = create_dataset("scenes", split="train", size=(32, 48), length=4, seed=1)
    ds2 = create_dataset("scenes", split="train", size=(32, 48), length=4, seed=1)
    for k, v in ds1[2].items():
        assert torch.equal(v, ds2[2][k])
    other_split = create_dataset("scenes", split="val", size=(32, 48), length=4, seed=1)
    other_seed = create_dataset("scenes", split="train", size=(32, 48), length=4, seed=2)
    assert not torch.equal(ds1[0]["depth"], other_split[0]["depth"])
    assert not torch.equal(ds1[0]["depth"], other_seed[0]["depth"])


def _points(s):
    """Camera-frame 3-D point of every pixel from the depth map and intrinsics: (H,W,3)."""
    h, w = s["depth"].shape
    v, u = np.mgrid[0:h, 0:w]
    rays = np.stack([u + 0.5, v + 0.5, np.ones_like(u)], -1).astype(np.float64) @ np.linalg.inv(s["K"]).T
    return rays * s["depth"][..., None]


def _planar_interior(mask, normals):
    """Pixels whose 3x3 neighbourhood is in ``mask`` and has one rendered normal (one plane)."""
    m = mask.copy()
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = False
    for dv in (-1, 0, 1):
        for du in (-1, 0, 1):
            shifted = lambda a: np.roll(np.roll(a, dv, 0), du, 1)  # noqa: E731
            m &= shifted(mask) & (np.abs(shifted(normals) - normals).max(-1) < 1e-5)
    return m


def _angle(a, b):
    return np.degrees(np.arccos(np.clip(np.sum(a * b, -1), -1, 1)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scene_geometry_is_consistent(seed):
    s = render_scene(seed, (96, 128))
    up, h = s["up"].astype(np.float64), float(s["camera_height"])
    floor = np.isin(s["label"], [FLOOR, RUG]) & (s["depth"] > 0)
    assert floor.sum() > 500
    # floor normals equal the camera-frame up vector
    assert _angle(s["normals"][floor], up).max() < 0.05
    # floor depth follows the plane equation up . X = -h
    P = _points(s)
    np.testing.assert_allclose(P[floor] @ up, -h, rtol=1e-4)
    # finite-difference normals of the depth map agree with the rendered ones on planes
    du = np.roll(P, -1, 1) - np.roll(P, 1, 1)
    dv = np.roll(P, -1, 0) - np.roll(P, 1, 0)
    n_fd = np.cross(dv, du)
    n_fd /= np.linalg.norm(n_fd, axis=-1, keepdims=True) + 1e-12
    for cls in (FLOOR, WALL):
        inner = _planar_interior((s["label"] == cls) & (s["depth"] > 0), s["normals"])
        assert inner.sum() > 100
        assert _angle(n_fd[inner], s["normals"][inner]).max() < 0.5


def test_scene_segmentation_is_not_colour_thresholding():
    train = [render_scene(i, (48, 64)) for i in range(20)]
    test = [render_scene(100 + i, (48, 64)) for i in range(10)]
    quant = lambda s: (np.clip(s["image"], 0, 0.999) * 8).astype(int).reshape(-1, 3) @ [64, 8, 1]  # noqa: E731
    table = np.zeros((512, len(SCENE_CLASSES)))
    for s in train:
        np.add.at(table, (quant(s), s["label"].ravel()), 1)
    lut = table.argmax(1)
    metric = create_task("seg", num_classes=len(SCENE_CLASSES)).metrics()
    for s in test:
        pred = torch.from_numpy(lut[quant(s)].reshape(1, 48, 64))
        metric.update(pred, torch.from_numpy(s["label"][None].astype(np.int64)))
    assert metric.compute()["miou"] < 40.0  # the best colour look-up table is poor


# rendering speed: benchmarks/data_speed.py (benchmarks/results/data_speed.md), not a test


def test_scenes_dataset_items_feed_the_tasks():
    ds = create_dataset("scenes", split="train", size=(32, 48), length=6, seed=0)
    assert len(ds) == 6 and ds.tasks == {"seg": {"num_classes": 7}, "depth": {}, "normals": {}}
    item = ds[0]
    assert item["image"].shape == (3, 32, 48) and item["image"].dtype == torch.float32
    assert item["seg"].dtype == torch.int64 and item["seg"].shape == (32, 48)
    assert item["depth"].shape == (1, 32, 48) and item["normals"].shape == (3, 32, 48)
    assert abs(item["image"].mean().item()) < 2.0  # ImageNet-normalised
    batch = next(iter(DataLoader(ds, batch_size=3)))
    for name, kwargs in ds.tasks.items():
        task = create_task(name, **kwargs)
        pred = task.make_head([8], (32, 48))(torch.randn(3, 8, 8, 12))
        assert torch.isfinite(task.loss(pred, batch[name]))
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(ValueError, match="split"):
        create_dataset("scenes", split="dev")


def test_scenes_image_level_tasks():
    ds = create_dataset("scenes", size=(32, 48), length=8, tasks=("seg", "classify", "attributes"), cache=True)
    assert ds.tasks["classify"] == {"num_classes": 3} and ds.tasks["attributes"] == {"num_attributes": 5}
    item = ds[1]
    assert set(item) == {"image", "seg", "classify", "attributes"}
    assert item["classify"].dtype == torch.int64 and 0 <= item["classify"].item() < 3
    assert item["attributes"].shape == (5,) and set(item["attributes"].tolist()) <= {0.0, 1.0}
    # the attribute "sphere" is set exactly when spheres cover >= 0.5 % of the label map
    sphere_frac = (item["seg"] == SCENE_CLASSES.index("sphere")).float().mean().item()
    assert item["attributes"][3].item() == float(sphere_frac >= 0.005)
    assert torch.equal(ds[1]["image"], item["image"])  # cached
    with pytest.raises(ValueError, match="tasks"):
        create_dataset("scenes", tasks=("seg", "edges"))


# ----------------------------------------------------------------------------- NYUv2 (.npy layout)
def _write_nyu(root, n_train=3, n_val=2, hw=(6, 8), num_classes=13):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for folder in ("image", "label", "depth", "normal"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            lab = rng.integers(-1, num_classes, hw).astype(np.float32)
            nrm = rng.normal(size=(*hw, 3))
            nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
            nrm[0, 0] = 0
            np.save(root / split / "image" / f"{i}.npy", rng.random((*hw, 3)).astype(np.float32))
            np.save(root / split / "label" / f"{i}.npy", lab)
            depth = rng.uniform(0.5, 5, (*hw, 1)).astype(np.float32)
            np.save(root / split / "depth" / f"{i}.npy", depth if i % 2 == 0 else depth[..., 0])  # HxWx1 and HxW
            np.save(root / split / "normal" / f"{i}.npy", nrm.astype(np.float32))
    return root


def test_nyuv2_loads_the_npy_layout(tmp_path):
    root = _write_nyu(tmp_path)
    ds = create_dataset("nyuv2", root=root, split="train")
    assert len(ds) == 3 and len(create_dataset("nyuv2", root=root, split="val")) == 2
    assert ds.tasks == {"seg": {"num_classes": 13}, "depth": {}, "normals": {}}
    for i in range(3):
        item = ds[i]
        raw = np.load(root / "train" / "label" / f"{i}.npy")
        assert item["image"].shape == (3, 6, 8) and item["depth"].shape == (1, 6, 8)
        assert item["normals"].shape == (3, 6, 8)
        np.testing.assert_array_equal(item["seg"].numpy(), np.where(raw < 0, 255, raw))
        np.testing.assert_allclose(item["depth"][0].numpy(), np.load(root / "train" / "depth" / f"{i}.npy").squeeze())
    raw_img = np.load(root / "train" / "image" / "0.npy")
    plain = create_dataset("nyuv2", root=root, split="train", normalize=False)[0]
    np.testing.assert_allclose(plain["image"].permute(1, 2, 0).numpy(), raw_img)
    only = create_dataset("nyuv2", root=root, tasks=("depth",))[0]
    assert set(only) == {"image", "depth"}


def test_nyuv2_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nyuv2 root"):
        create_dataset("nyuv2", root=tmp_path / "nowhere")
    root = _write_nyu(tmp_path / "a")
    with pytest.raises(ValueError, match="split"):
        create_dataset("nyuv2", root=root, split="dev")
    (root / "train" / "normal" / "2.npy").unlink()
    with pytest.raises(ValueError, match="different numbers"):
        create_dataset("nyuv2", root=root)
    for f in (root / "train" / "normal").iterdir():
        f.unlink()
    (root / "train" / "normal").rmdir()
    with pytest.raises(FileNotFoundError, match="normal"):
        create_dataset("nyuv2", root=root)
    root = _write_nyu(tmp_path / "b")
    (root / "val" / "image" / "1.npy").rename(root / "val" / "image" / "5.npy")
    with pytest.raises(ValueError, match="0.npy"):
        create_dataset("nyuv2", root=root, split="val")
    root = _write_nyu(tmp_path / "c", num_classes=40)
    ds = create_dataset("nyuv2", root=root)
    with pytest.raises(ValueError, match="outside"):
        [ds[i] for i in range(len(ds))]
    assert create_dataset("nyuv2", root=root, num_classes=40)[0]["seg"].max() < 256
    np.save(root / "train" / "depth" / "0.npy", np.ones((5, 8), np.float32))
    with pytest.raises(ValueError, match="differ in size"):
        create_dataset("nyuv2", root=root, num_classes=40)[0]


def _load_frame(prefix, kind, idx, size, resample):
    return Image.open(NYUD_FRAMES / f"{prefix}_{kind}{idx}.png").resize(size[::-1], resample)


@pytest.mark.skipif(not NYUD_FRAMES.is_dir(), reason=f"real NYUD frames not found at {NYUD_FRAMES}")
def test_nyuv2_loader_on_real_frames(tmp_path):
    """Two real NYUD-v2 frames converted to the .npy layout (40 classes, metres) load correctly."""
    size = (192, 256)  # (H, W)
    for folder in ("image", "label", "depth", "normal"):
        (tmp_path / "val" / folder).mkdir(parents=True)
    for i, (prefix, idx) in enumerate((("ExpNYUD_three", "000433"), ("ExpNYUD_joint", "000464"))):
        img = np.asarray(_load_frame(prefix, "", idx, size, Image.BILINEAR), np.float32) / 255
        lab = np.asarray(_load_frame(prefix, "segm_gt_", idx, size, Image.NEAREST)).astype(np.float32)
        lab[lab == 255] = -1
        depth = np.asarray(_load_frame(prefix, "depth_gt_", idx, size, Image.NEAREST), np.float32)[..., None] / 5000
        np.save(tmp_path / "val" / "image" / f"{i}.npy", img)
        np.save(tmp_path / "val" / "label" / f"{i}.npy", lab)
        np.save(tmp_path / "val" / "depth" / f"{i}.npy", depth)
        np.save(tmp_path / "val" / "normal" / f"{i}.npy", np.zeros((*size, 3), np.float32))
    ds = create_dataset("nyuv2", root=tmp_path, split="test", num_classes=40)
    for i in range(2):
        item = ds[i]
        assert item["image"].shape == (3, *size)
        seg, depth = item["seg"], item["depth"]
        assert ((seg < 40) | (seg == 255)).all() and (seg < 40).float().mean() > 0.5
        valid = depth > 0
        assert valid.float().mean() > 0.5 and 0.3 < depth[valid].min() and depth[valid].max() < 10.0
    with pytest.raises(ValueError, match="outside"):
        create_dataset("nyuv2", root=tmp_path, split="val")[0]  # 13 classes: wrong for 40-class labels


# ----------------------------------------------------------------------------- Cityscapes (.npy layout)
def _write_cityscapes(root, label_dirs=("label_2", "label_7", "label_19"), n=2, hw=(4, 8)):
    rng = np.random.default_rng(1)
    classes = {"label_2": 2, "label_7": 7, "label_19": 19, "label": 7}
    for split in ("train", "val"):
        for folder in ("image", "depth", *label_dirs):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            np.save(root / split / "image" / f"{i}.npy", rng.random((*hw, 3)).astype(np.float32))
            disp = rng.random((*hw, 1)).astype(np.float32) * 0.05
            disp[0, 0] = 0
            np.save(root / split / "depth" / f"{i}.npy", disp)
            for d in label_dirs:
                np.save(root / split / d / f"{i}.npy", rng.integers(-1, classes[d], hw).astype(np.float32))
    return root


def test_cityscapes_loads_2_7_19_classes(tmp_path):
    root = _write_cityscapes(tmp_path)
    for classes in (2, 7, 19):
        ds = create_dataset("cityscapes", root=root, split="train", classes=classes)
        assert ds.tasks == {"seg": {"num_classes": classes}, "depth": {}}
        item = ds[1]
        raw = np.load(root / "train" / f"label_{classes}" / "1.npy")
        np.testing.assert_array_equal(item["seg"].numpy(), np.where(raw < 0, 255, raw))
        assert item["depth"].shape == (1, 4, 8) and item["depth"][0, 0, 0] == 0
    assert len(create_dataset("cityscapes", root=root, split="val")) == 2


def test_cityscapes_libmtl_layout_and_errors(tmp_path):
    root = _write_cityscapes(tmp_path / "libmtl", label_dirs=("label",))
    assert create_dataset("cityscapes", root=root)[0]["seg"].shape == (4, 8)
    with pytest.raises(FileNotFoundError, match="label_19"):
        create_dataset("cityscapes", root=root, classes=19)
    with pytest.raises(ValueError, match="classes"):
        create_dataset("cityscapes", root=root, classes=5)
    with pytest.raises(FileNotFoundError, match="cityscapes"):
        create_dataset("cityscapes", root=tmp_path / "missing")
    root = _write_cityscapes(tmp_path / "mtan", label_dirs=("label_7",))
    np.save(root / "train" / "label_7" / "0.npy", np.full((4, 8), 9, np.float32))
    with pytest.raises(ValueError, match=r"\[9\] outside \[0, 7\)"):
        create_dataset("cityscapes", root=root)[0]


# ----------------------------------------------------------------------------- CelebA
ATTRS = ["Smiling", "Male", "Young"]


def _write_celeba(root, n=5, parts=(0, 0, 0, 1, 2)):
    (root / "img_align_celeba").mkdir(parents=True)
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    rng = np.random.default_rng(2)
    vals = rng.choice([-1, 1], (n, len(ATTRS)))
    for f in files:
        Image.fromarray(rng.integers(0, 255, (22, 18, 3), dtype=np.uint8)).save(root / "img_align_celeba" / f)
    rows = [f"{f} " + " ".join(f"{v:2d}" for v in row) for f, row in zip(files, vals)]
    (root / "list_attr_celeba.txt").write_text(f"{n}\n" + " ".join(ATTRS) + "\n" + "\n".join(rows) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(f"{f} {p}" for f, p in zip(files, parts)) + "\n")
    return root, files, (vals > 0).astype(np.float32)


def test_celeba_loads_official_files(tmp_path):
    root, files, vals = _write_celeba(tmp_path)
    ds = create_dataset("celeba", root=root, split="train")
    assert len(ds) == 3 and ds.tasks == {"attributes": {"num_attributes": 3}}
    item = ds[2]
    assert item["image"].shape == (3, 22, 18)
    np.testing.assert_array_equal(item["attributes"].numpy(), vals[2])
    assert len(create_dataset("celeba", root=root, split="val")) == 1
    test = create_dataset("celeba", root=root, split="test", attributes=["Young", "Smiling"], size=(16, 12))
    assert test[0]["image"].shape == (3, 16, 12)
    np.testing.assert_array_equal(test[0]["attributes"].numpy(), vals[4][[2, 0]])
    assert test.tasks == {"attributes": {"num_attributes": 2}}


def test_celeba_torchvision_layout(tmp_path):
    _write_celeba(tmp_path / "celeba")
    assert len(create_dataset("celeba", root=tmp_path, split="train")) == 3


def test_celeba_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="celeba root"):
        create_dataset("celeba", root=tmp_path / "none")
    root, files, _ = _write_celeba(tmp_path / "a")
    with pytest.raises(ValueError, match="unknown attributes.*Smiling"):
        create_dataset("celeba", root=root, attributes=["Bald"])
    (root / "img_align_celeba" / files[1]).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        create_dataset("celeba", root=root, split="train")
    assert len(create_dataset("celeba", root=root, split="val")) == 1  # other splits still load
    root, files, _ = _write_celeba(tmp_path / "b", parts=(0, 0, 0, 1))
    with pytest.raises(ValueError, match="partition"):
        create_dataset("celeba", root=root)
    root, _, _ = _write_celeba(tmp_path / "c")
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_eval_partition"):
        create_dataset("celeba", root=root)
    root, _, _ = _write_celeba(tmp_path / "d")
    text = (root / "list_attr_celeba.txt").read_text().replace("5\n", "6\n", 1)
    (root / "list_attr_celeba.txt").write_text(text)
    with pytest.raises(ValueError, match="6 images but 5 rows"):
        create_dataset("celeba", root=root)
