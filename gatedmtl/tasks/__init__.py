"""Tasks: heads, losses, metrics, and multi-task summary scores (ΔMTL, Mean Rank).

Types: seg, depth, normals, boundary (dense); classify, attributes (image level).

>>> task = create_task("seg", num_classes=7)
>>> head = task.make_head([64, 128], input_size=(96, 128))
"""
from .base import Task
from .dense import BoundaryTask, DepthTask, NormalsTask, SegTask
from .evaluation import delta_mtl, mean_rank
from .heads import DenseHead, ImageHead
from .image import AttributesTask, ClassifyTask
from .losses import attributes_loss, boundary_loss, classify_loss, depth_l1_loss, normal_cosine_loss, seg_loss
from .metrics import AttributeMetric, BoundaryMetric, ClassifyMetric, DepthMetric, Metric, NormalMetric, SegMetric
from .registry import available_tasks, create_task, register_task

__all__ = [
    "Task",
    "create_task",
    "register_task",
    "available_tasks",
    "delta_mtl",
    "mean_rank",
    "SegTask",
    "DepthTask",
    "NormalsTask",
    "BoundaryTask",
    "ClassifyTask",
    "AttributesTask",
    "DenseHead",
    "ImageHead",
    "Metric",
    "SegMetric",
    "DepthMetric",
    "NormalMetric",
    "ClassifyMetric",
    "AttributeMetric",
    "BoundaryMetric",
    "seg_loss",
    "depth_l1_loss",
    "normal_cosine_loss",
    "classify_loss",
    "attributes_loss",
    "boundary_loss",
]
