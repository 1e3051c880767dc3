"""Reader for the IDX files of MNIST and Fashion-MNIST (gzipped or not).

The format (LeCun et al., http://yann.lecun.com/exdb/mnist/, "FILE FORMATS"): two zero bytes,
a type code, the number of dimensions D, then D big-endian uint32 sizes, then the values in
row-major order, big-endian. ``train-images-idx3-ubyte`` is ``[N, 28, 28]`` uint8 and
``train-labels-idx1-ubyte`` is ``[N]`` uint8.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "IDX_TYPES"]

#: IDX type code -> numpy dtype (big-endian).
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    if head == _GZIP_MAGIC:  # by content, not by name: a renamed .gz still reads
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupted gzip stream ({e})") from None
    return path.read_bytes()


def read_idx(path: str | os.PathLike[str], ndim: int | None = None) -> np.ndarray:
    """The array stored in the IDX file ``path`` (native byte order; gzip detected by content).

    ``ndim`` (e.g. 3 for images, 1 for labels) is checked when given. Raises ``ValueError`` for
    a header that is not IDX, an unknown type code, a wrong number of dimensions, or a payload
    whose size does not match the header.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"expected an IDX file at {p}")
    data = _read_bytes(p)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{p}: not an IDX file (header {data[:4].hex() or 'empty'}; expected 0000<type><ndim>)")
    code, dims = data[2], data[3]
    if code not in IDX_TYPES:
        raise ValueError(f"{p}: unknown IDX type code 0x{code:02x} (known: {', '.join(f'0x{c:02x}' for c in IDX_TYPES)})")
    if ndim is not None and dims != ndim:
        raise ValueError(f"{p}: IDX file has {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise ValueError(f"{p}: truncated IDX header ({len(data)} bytes, {dims} dimensions need {header})")
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=dims, offset=4))
    dtype = IDX_TYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{p}: IDX payload is {len(data) - header} bytes, header {shape} x {dtype.itemsize} "
                         f"bytes needs {expected} (truncated or corrupted file)")
    arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)
