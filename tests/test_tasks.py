"""Tasks: registry, heads, losses, metrics (hand-computed), ΔMTL and Mean Rank."""
import math

import numpy as np
import pytest
import torch

from gatedmtl.tasks import Task, available_tasks, create_task, delta_mtl, mean_rank
from gatedmtl.tasks.losses import boundary_loss
from gatedmtl.tasks.metrics import AttributeMetric, BoundaryMetric, ClassifyMetric, DepthMetric, NormalMetric, SegMetric

TASK_KWARGS = {
    "seg": {"num_classes": 5},
    "depth": {},
    "normals": {},
    "classify": {"num_classes": 4},
    "attributes": {"num_attributes": 3},
    "boundary": {},
}


# ----------------------------------------------------------------------------- registry / API
def test_registry_lists_all_tasks_and_rejects_unknown():
    assert set(available_tasks()) == set(TASK_KWARGS)
    with pytest.raises(ValueError, match="seg.*depth|depth.*seg"):
        create_task("segmentation", num_classes=3)


@pytest.mark.parametrize("name", list(TASK_KWARGS))
def test_task_interface(name):
    task = create_task(name, **TASK_KWARGS[name])
    assert isinstance(task, Task) and task.name == name
    assert task.primary_metric in task.higher_is_better
    hib = task.higher_is_better
    hib["bogus"] = True  # a fresh dict: no shared mutable state
    assert "bogus" not in task.higher_is_better
    assert set(task.metrics().compute()) == set(task.higher_is_better)


def test_primary_metrics_follow_gatedmtl_convention():
    assert create_task("seg", num_classes=3).primary_metric == "miou"
    assert create_task("depth").primary_metric == "rmse"
    assert create_task("normals").primary_metric == "mean_angle"
    assert create_task("classify", num_classes=3).primary_metric == "acc"
    assert create_task("attributes", num_attributes=2).primary_metric == "mean_acc"
    assert create_task("depth").higher_is_better["rmse"] is False
    assert create_task("normals").higher_is_better["within_11.25"] is True


# ----------------------------------------------------------------------------- heads
FEATS = [torch.randn(2, 8, 16, 24), torch.randn(2, 16, 8, 12), torch.randn(2, 32, 4, 6)]


@pytest.mark.parametrize("name,out", [("seg", 5), ("depth", 1), ("normals", 3)])
def test_dense_heads_fuse_all_maps_and_upsample_to_input(name, out):
    task = create_task(name, **TASK_KWARGS[name])
    head = task.make_head([8, 16, 32], (32, 48))
    y = head(FEATS)
    assert y.shape == (2, out, 32, 48)
    assert head(FEATS, output_size=(20, 30)).shape == (2, out, 20, 30)
    # every scale influences the output
    feats = [f.clone().requires_grad_(True) for f in FEATS]
    head(feats).sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_dense_head_single_map_and_errors():
    head = create_task("seg", num_classes=3).make_head([16], (16, 16))
    assert head(torch.randn(2, 16, 4, 4)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="dense head"):
        head(torch.randn(2, 16))
    with pytest.raises(ValueError, match="channels"):
        head(torch.randn(2, 12, 4, 4))


@pytest.mark.parametrize("name,out", [("classify", 4), ("attributes", 3)])
def test_image_heads_accept_maps_lists_and_vectors(name, out):
    task = create_task(name, **TASK_KWARGS[name])
    assert task.make_head([8, 16, 32], (32, 48))(FEATS).shape == (2, out)
    assert task.make_head([32], (32, 48))(torch.randn(2, 32)).shape == (2, out)
    head = task.make_head([32], (32, 48))
    x = torch.randn(2, 32, 3, 5)
    assert torch.allclose(head(x), head(x.mean(dim=(2, 3))), atol=1e-6)  # global average pool


# ----------------------------------------------------------------------------- losses
def test_seg_loss_skips_ignore_index():
    task = create_task("seg", num_classes=3)
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.tensor([[[0, 2], [255, 1]]])
    ce = -torch.log_softmax(logits, 1)[0]
    manual = (ce[0, 0, 0] + ce[2, 0, 1] + ce[1, 1, 1]) / 3
    assert torch.allclose(task.loss(logits, target), manual)
    all_ignored = task.loss(logits, torch.full((1, 2, 2), 255))
    assert all_ignored.item() == 0.0
    all_ignored.backward()  # still differentiable


def test_depth_loss_is_masked_l1():
    pred = torch.tensor([[[[1.0, 5.0], [2.0, 100.0]]]])
    gt = torch.tensor([[[[2.0, 3.0], [2.0, 0.0]]]])  # last pixel invalid
    assert math.isclose(create_task("depth").loss(pred, gt).item(), (1 + 2 + 0) / 3)
    assert math.isclose(create_task("depth").loss(pred, gt[:, 0]).item(), 1.0)  # [B,H,W] target too


def test_normal_loss_is_one_minus_masked_cosine():
    task = create_task("normals")
    gt = torch.zeros(1, 3, 1, 3)
    gt[0, 2, 0, 0] = 1.0
    gt[0, 0, 0, 1] = 1.0  # third pixel invalid (0)
    assert task.loss(5 * gt, gt).item() == pytest.approx(0.0, abs=1e-6)  # scale-invariant
    pred = -gt.clone()
    pred[0, :, 0, 2] = torch.tensor([3.0, 1.0, 2.0])  # invalid pixel must not count
    assert task.loss(pred, gt).item() == pytest.approx(2.0)


def test_dense_losses_accept_half_precision_predictions():
    gt = torch.nn.functional.normalize(torch.randn(2, 3, 4, 4), dim=1)
    pred = torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16)  # zero-length normals must not give nan
    loss = create_task("normals").loss(pred, gt)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(1.0)
    depth = create_task("depth").loss(torch.ones(2, 1, 4, 4, dtype=torch.bfloat16), torch.full((2, 1, 4, 4), 3.0))
    assert depth.dtype == torch.float32 and depth.item() == pytest.approx(2.0)


def test_classify_and_attribute_losses():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 0])
    manual = -(torch.log_softmax(logits, 1)[0, 0] + torch.log_softmax(logits, 1)[1, 0]) / 2
    assert torch.allclose(create_task("classify", num_classes=2).loss(logits, target), manual)
    x, y = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    manual = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert create_task("attributes", num_attributes=2).loss(x, y).item() == pytest.approx(manual)


# ----------------------------------------------------------------------------- metrics
def test_seg_metric_2x2_confusion_matrix():
    m = SegMetric(num_classes=2)
    target = torch.tensor([[[0, 0, 1, 1, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1, 0]]])  # ignored pixel predicted wrong: not counted
    m.update(pred, target)
    assert m.conf.tolist() == [[1, 1], [0, 2]]
    out = m.compute()
    # IoU_0 = 1 / (2 + 1 - 1) = 1/2, IoU_1 = 2 / (2 + 3 - 2) = 2/3
    assert out["miou"] == pytest.approx(100 * (0.5 + 2 / 3) / 2)
    assert out["pixel_acc"] == pytest.approx(75.0)
    # logits [B,K,H,W] give the same result; ignore_index is a parameter
    m2 = SegMetric(num_classes=2, ignore_index=-1)
    logits = torch.nn.functional.one_hot(pred.clamp(max=1), 2).permute(0, 3, 1, 2).float()
    m2.update(logits, torch.tensor([[[0, 0, 1, 1, -1]]]))
    assert m2.compute() == out


def test_seg_metric_pools_over_batches_and_rejects_bad_labels():
    a, b = SegMetric(3), SegMetric(3)
    t1, p1 = torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 1]])
    t2, p2 = torch.tensor([[2, 2, 0]]), torch.tensor([[2, 0, 0]])
    a.update(p1, t1)
    a.update(p2, t2)
    b.update(torch.cat([p1, p2], 1), torch.cat([t1, t2], 1))
    assert a.compute() == b.compute()
    with pytest.raises(ValueError, match="outside"):
        a.update(torch.tensor([[0]]), torch.tensor([[7]]))


def test_depth_metric_pools_rmse_over_the_dataset():
    m = DepthMetric()
    # batch 1: two valid pixels, errors 1 and 1 (and an invalid pixel with a huge error)
    m.update(torch.tensor([[[[2.0, 3.0, 50.0]]]]), torch.tensor([[[[1.0, 2.0, 0.0]]]]))
    # batch 2: one valid pixel, error 3
    m.update(torch.tensor([[[[7.0]]]]), torch.tensor([[[[4.0]]]]))
    out = m.compute()
    pooled = math.sqrt((1 + 1 + 9) / 3)
    averaged_per_batch = (math.sqrt((1 + 1) / 2) + math.sqrt(9 / 1)) / 2
    assert out["rmse"] == pytest.approx(pooled)
    assert abs(out["rmse"] - averaged_per_batch) > 0.05
    assert out["abs_err"] == pytest.approx(5 / 3)
    assert out["rel_err"] == pytest.approx((1 / 1 + 1 / 2 + 3 / 4) / 3)


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_normal_metric_angles_of_known_vectors():
    s20 = math.sin(math.radians(20))
    c20 = math.cos(math.radians(20))
    gt = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.float32)
    pred = torch.tensor([[0, 0, 2], [s20, 0, c20], [1, 0, 1], [0, 1, 0], [0, 0, -1], [1, 0, 0]], dtype=torch.float32)
    m = NormalMetric()
    m.update(pred.T.reshape(1, 3, 1, 6), gt.T.reshape(1, 3, 1, 6))
    out = m.compute()  # errors 0, 20, 45, 90, 180; last pixel invalid
    assert out["mean_angle"] == pytest.approx((0 + 20 + 45 + 90 + 180) / 5, abs=1e-3)
    assert out["median_angle"] == pytest.approx(45.0, abs=1e-3)
    assert out["within_11.25"] == pytest.approx(20.0)
    assert out["within_22.5"] == pytest.approx(40.0)
    assert out["within_30"] == pytest.approx(40.0)


def test_normal_metric_clamps_and_pools_median():
    n = torch.tensor(_unit([1.0, 1.0, 1.0]), dtype=torch.float32).view(1, 3, 1, 1).repeat(1, 1, 1, 4)
    m = NormalMetric()
    m.update(n * 3, n)  # cosine may round above 1 without the clamp
    assert m.compute()["mean_angle"] == pytest.approx(0.0, abs=0.05)
    # pooled median over two batches [0,0,0] and [90, 90] is 0 (per-batch medians would average to 45)
    m = NormalMetric()
    z = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    x = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    m.update(z.repeat(1, 1, 1, 3), z.repeat(1, 1, 1, 3))
    m.update(x.repeat(1, 1, 1, 2), z.repeat(1, 1, 1, 2))
    assert m.compute()["median_angle"] == pytest.approx(0.0, abs=1e-4)
    assert m.compute()["mean_angle"] == pytest.approx(36.0, abs=1e-3)


def test_classify_and_attribute_metrics():
    m = ClassifyMetric()
    m.update(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))
    assert m.compute()["acc"] == pytest.approx(200 / 3)
    a = AttributeMetric(2)
    a.update(torch.tensor([[1.0, -1.0], [1.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    # attribute 0: 1/2 correct, attribute 1: 1/2 correct
    a.update(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    assert a.per_attribute() == pytest.approx([75.0, 75.0])
    assert a.compute()["mean_acc"] == pytest.approx(75.0)


def test_metric_merge_equals_single_accumulator():
    torch.manual_seed(0)
    for name in TASK_KWARGS:
        task = create_task(name, **TASK_KWARGS[name])
        head = task.make_head([8], (6, 6))
        batches = []
        for _ in range(2):
            pred = head(torch.randn(2, 8, 3, 3)).detach()
            batches.append((pred, _random_target(name, 2, (6, 6))))
        whole, a, b = task.metrics(), task.metrics(), task.metrics()
        for p, t in batches:
            whole.update(p, t)
        a.update(*batches[0])
        b.update(*batches[1])
        assert a.merge(b).compute() == pytest.approx(whole.compute())


def _random_target(name, b, size):
    if name == "seg":
        return torch.randint(0, 5, (b, *size))
    if name == "depth":
        return torch.rand(b, 1, *size) * 3
    if name == "normals":
        return torch.nn.functional.normalize(torch.randn(b, 3, *size), dim=1)
    if name == "classify":
        return torch.randint(0, 4, (b,))
    if name == "boundary":
        return (torch.rand(b, 1, *size) < 0.2).float()
    return torch.randint(0, 2, (b, 3)).float()


@pytest.mark.parametrize("name", list(TASK_KWARGS))
def test_heads_losses_train_end_to_end(name):
    torch.manual_seed(0)
    task = create_task(name, **TASK_KWARGS[name])
    head = task.make_head([8, 16], (8, 8))
    feats = [torch.randn(4, 8, 4, 4), torch.randn(4, 16, 2, 2)]
    target = _random_target(name, 4, (8, 8))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = task.loss(head(feats), target)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    m = task.metrics()
    head.eval()
    m.update(head(feats), target)
    assert all(math.isfinite(v) for v in m.compute().values())


# ----------------------------------------------------------------------------- boundary task
def _bce(x, y):
    p = 1 / (1 + math.exp(-x))
    return -math.log(p) if y else -math.log(1 - p)


def test_boundary_loss_is_class_balanced_bce():
    pred = torch.tensor([2.0, -1.0, 0.5, -3.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 2, 2)
    terms = [_bce(x, y) for x, y in zip([2.0, -1.0, 0.5, -3.0], [1, 0, 0, 0])]
    w = 3 / 4  # share of non-boundary pixels (HED)
    assert boundary_loss(pred, target).item() == pytest.approx((w * terms[0] + (1 - w) * sum(terms[1:])) / 4, rel=1e-6)
    assert boundary_loss(pred, target, 0.95).item() == pytest.approx((0.95 * terms[0] + 0.05 * sum(terms[1:])) / 4, rel=1e-6)
    task = create_task("boundary", pos_weight=0.95)
    assert task.loss(pred, target).item() == pytest.approx(boundary_loss(pred, target, 0.95).item())
    with pytest.raises(ValueError, match="pos_weight"):
        create_task("boundary", pos_weight=1.5)


def test_boundary_metric_hand_computed():
    gt = torch.zeros(1, 1, 6, 6)
    gt[..., :, 2] = 1  # a vertical line, 6 pixels
    logits = torch.full((1, 1, 6, 6), -5.0)
    logits[..., :, 3] = 5.0  # the line predicted one column off
    logits[..., 0, 0] = 5.0  # a false positive far away
    exact = BoundaryMetric()
    exact.update(logits, gt)
    assert exact.compute() == {"odsf": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    near = BoundaryMetric(tolerance=1)
    near.update(logits, gt[:, 0])
    p, r = 6 / 7, 1.0
    assert near.compute()["precision"] == pytest.approx(100 * p) and near.compute()["recall"] == pytest.approx(100)
    assert near.compute()["f1"] == pytest.approx(100 * 2 * p * r / (p + r))
    # ODS: one threshold for the whole set; here 0.8 removes the false positive (probability 0.7)
    logits[..., 0, 0] = math.log(0.7 / 0.3)
    ods = BoundaryMetric(tolerance=1)
    ods.update(logits, gt)
    out = ods.compute()
    assert out["odsf"] == pytest.approx(100.0) and out["f1"] == pytest.approx(100 * 2 * p / (p + 1))
    empty = BoundaryMetric()
    assert all(math.isnan(v) for v in empty.compute().values())
    with pytest.raises(ValueError, match="tolerance"):
        BoundaryMetric(tolerance=-1)


# ----------------------------------------------------------------------------- ΔMTL and Mean Rank
# GatedMTL rebuttal, NYUD-v2 / HRNet-18 (ALGORITHMS.md §1.6): mIoU, depth RMSE, normals mean angle,
# the reported ΔMTL and MR.
GATEDMTL_HRNET = [
    ("STL", 41.70, 0.582, 18.89, 0.0, 8.0),
    ("MTL (uniform)", 41.83, 0.582, 22.84, -6.86, 11.0),
    ("DWA", 41.86, 0.580, 22.61, -6.29, 8.7),
    ("Uncertainty", 41.49, 0.575, 22.27, -5.73, 8.3),
    ("Auto-lambda", 42.71, 0.577, 22.87, -5.92, 7.7),
    ("RLW", 42.10, 0.593, 23.29, -8.09, 11.7),
    ("PCGrad", 41.75, 0.581, 22.73, -6.70, 10.3),
    ("MGDA", 41.23, 0.625, 21.07, -6.68, 11.3),
    ("CAGrad", 42.31, 0.580, 22.79, -6.28, 8.7),
    ("GatedMTL 1", 43.58, 0.557, 19.32, 2.18, 1.3),
    ("GatedMTL 2", 42.93, 0.5613, 19.72, 0.70, 2.3),
    ("GatedMTL 3", 42.43, 0.5671, 20.01, -0.54, 4.0),
    ("GatedMTL 4", 42.85, 0.5778, 21.01, -2.58, 5.0),
    ("GatedMTL 5", 42.35, 0.5755, 21.70, -4.06, 6.0),
]
HIB = {t: create_task(t, **TASK_KWARGS[t]).higher_is_better for t in ("seg", "depth", "normals")}
PRIMARY = {"seg": "miou", "depth": "rmse", "normals": "mean_angle"}


def _row(seg, depth, normals):
    return {"seg": {"miou": seg}, "depth": {"rmse": depth}, "normals": {"mean_angle": normals}}


TABLE = {r[0]: _row(*r[1:4]) for r in GATEDMTL_HRNET}


def test_delta_mtl_reproduces_gatedmtl_table():
    stl = TABLE["STL"]
    assert delta_mtl(TABLE["MTL (uniform)"], stl, HIB, PRIMARY) == pytest.approx(-6.86, abs=0.01)
    assert delta_mtl(TABLE["GatedMTL 1"], stl, HIB, PRIMARY) == pytest.approx(2.18, abs=0.01)
    assert delta_mtl(stl, stl, HIB, PRIMARY) == 0.0
    for name, *_, delta, _mr in GATEDMTL_HRNET:  # the rest up to the paper's rounding of inputs
        assert delta_mtl(TABLE[name], stl, HIB, PRIMARY) == pytest.approx(delta, abs=0.04)


def test_delta_mtl_conventions_differ_as_documented():
    hib = {"a": {"up": True, "down": False}, "b": {"up": True}}
    base = {"a": {"up": 10.0, "down": 2.0}, "b": {"up": 50.0}}
    res = {"a": {"up": 11.0, "down": 2.4}, "b": {"up": 52.0}}
    # LibMTL: task a: (+10% - 20%) / 2 = -5%; task b: +4%; mean over tasks = -0.5%
    assert delta_mtl(res, base, hib) == pytest.approx(-0.5)
    # Vandenhende: one metric per task: (+10% + 4%) / 2
    assert delta_mtl(res, base, hib, {"a": "up", "b": "up"}) == pytest.approx(7.0)
    assert delta_mtl(res, base, hib, {"a": "down", "b": "up"}) == pytest.approx(-8.0)
    with pytest.raises(KeyError):
        delta_mtl({"c": {"up": 1.0}}, base, hib)


def test_mean_rank_reproduces_gatedmtl_table():
    mr = mean_rank(TABLE, HIB, PRIMARY)
    assert mr["STL"] == pytest.approx(8.0)  # (12 + 11 + 1) / 3, tied depth shares rank 11
    assert mr["MTL (uniform)"] == pytest.approx(11.0)  # (10 + 11 + 12) / 3
    for name, *_, reported in GATEDMTL_HRNET:
        assert mr[name] == pytest.approx(reported, abs=0.05)
    assert mean_rank(TABLE, HIB) == mr  # one metric per task: same with all metrics


def test_mean_rank_ties_share_best_rank():
    hib = {"t": {"acc": True, "err": False}}
    table = {k: {"t": {"acc": a, "err": e}} for k, a, e in [("x", 1.0, 3.0), ("y", 1.0, 1.0), ("z", 2.0, 1.0)]}
    # acc: z 1, x/y 2; err: y/z 1, x 3
    assert mean_rank(table, hib) == {"x": 2.5, "y": 1.5, "z": 1.0}
    assert mean_rank(table, hib, {"t": "acc"}) == {"x": 2.0, "y": 2.0, "z": 1.0}
