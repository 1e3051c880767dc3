"""Data sets: the embedded procedural "scenes" set and loaders for NYUv2, Cityscapes, CelebA."""
from .base import IMAGENET_MEAN, IMAGENET_STD, MultiTaskDataset, image_to_tensor
from .registry import available_datasets, create_dataset, register_dataset
from .celeba import CelebADataset
from .cityscapes import CityscapesDataset
from .nyuv2 import NYUv2Dataset
from .scenes import SCENE_ATTRIBUTES, SCENE_CLASSES, SCENE_OBJECT_CLASSES, ScenesDataset, render_scene

__all__ = [
    "MultiTaskDataset",
    "create_dataset",
    "register_dataset",
    "available_datasets",
    "render_scene",
    "ScenesDataset",
    "NYUv2Dataset",
    "CityscapesDataset",
    "CelebADataset",
    "SCENE_CLASSES",
    "SCENE_OBJECT_CLASSES",
    "SCENE_ATTRIBUTES",
    "image_to_tensor",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
