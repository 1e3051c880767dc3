"""Data sets: the embedded procedural "scenes" set; sets built from real Fashion-MNIST / MNIST
items (MultiMNIST, MultiFashion, Multi-(Fashion+MNIST), fashion scenes); loaders for NYUv2,
NYUD-v2 PNG frames, Cityscapes, CelebA; scikit-image's motorcycle stereo pair (a real disparity map)."""
from .base import IMAGENET_MEAN, IMAGENET_STD, MultiTaskDataset, image_to_tensor
from .registry import available_datasets, create_dataset, dataset_tasks, register_dataset
from .celeba import CelebADataset
from .cityscapes import CityscapesDataset
from .fashion_scenes import FASHION_SCENE_CLASSES, FashionScenesDataset, render_fashion_scene
from .idx import read_idx
from .items import (
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    ItemSet,
    load_fashion_mnist,
    load_mnist,
)
from .multi_mnist import FashionMNISTMNISTDataset, MultiFashionDataset, MultiMNISTDataset, build_overlay_set
from .nyud_png import NYUDPngDataset
from .nyuv2 import NYUv2Dataset
from .stereo import load_stereo_motorcycle, motorcycle_left_path
from .scenes import SCENE_ATTRIBUTES, SCENE_CLASSES, SCENE_OBJECT_CLASSES, ScenesDataset, render_scene

__all__ = [
    "MultiTaskDataset",
    "create_dataset",
    "register_dataset",
    "available_datasets",
    "dataset_tasks",
    "render_scene",
    "ScenesDataset",
    "NYUv2Dataset",
    "CityscapesDataset",
    "CelebADataset",
    "NYUDPngDataset",
    "MultiMNISTDataset",
    "MultiFashionDataset",
    "FashionMNISTMNISTDataset",
    "FashionScenesDataset",
    "build_overlay_set",
    "render_fashion_scene",
    "read_idx",
    "load_stereo_motorcycle",
    "motorcycle_left_path",
    "load_fashion_mnist",
    "load_mnist",
    "ItemSet",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "FASHION_SCENE_CLASSES",
    "DEBIAN_FASHION_MNIST",
    "SCENE_CLASSES",
    "SCENE_OBJECT_CLASSES",
    "SCENE_ATTRIBUTES",
    "image_to_tensor",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
