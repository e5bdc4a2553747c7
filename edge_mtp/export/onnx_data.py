"""External data of ONNX graphs, one tensor at a time: read an initializer (or some of its rows) from its data file,
and stream initializers into a new data file. Neither side ever holds more than the tensor (or rows) asked for."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..util.errors import EdgeMtpError

_ALIGN_LARGE, _ALIGN, _LARGE = 1 << 16, 64, 1 << 20  # large weights page-aligned, so onnxruntime can map them


@dataclass
class Placed:
    """An initializer whose bytes the caller wrote into the data file itself (a widened vocabulary table)."""

    dims: list[int]
    offset: int
    nbytes: int


def _location(init, folder: Path) -> tuple[Path, int, int]:
    """(data file, offset, length) of an external initializer, checked against the file's size."""
    info = {e.key: e.value for e in init.external_data}
    path = folder / info["location"]
    offset, length = int(info.get("offset", 0)), int(info["length"])
    size = path.stat().st_size if path.is_file() else None
    if size is None or offset + length > size:
        raise EdgeMtpError(f"{path} {'is missing' if size is None else f'has {size} bytes'} but tensor '{init.name}' "
                           f"is stored at bytes {offset}..{offset + length}; the file is truncated or belongs to "
                           "another graph. Copy the whole bundle folder again or re-export it.")
    return path, offset, length


def stored_bytes(init, folder: Path) -> bytes:
    """An initializer's stored bytes, inline or external (in `folder`)."""
    import onnx

    if init.data_location != onnx.TensorProto.EXTERNAL:
        return init.raw_data if init.HasField("raw_data") else onnx.numpy_helper.to_array(init).tobytes()
    path, offset, length = _location(init, folder)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def stored_nbytes(init) -> int:
    """Bytes an initializer stores (its external length, or its inline data), without reading external data."""
    import onnx

    if init.data_location == onnx.TensorProto.EXTERNAL:
        return int({e.key: e.value for e in init.external_data}["length"])
    return len(stored_bytes(init, Path()))


def stored_array(init, folder: Path) -> np.ndarray:
    """An initializer as an array (external data read from `folder`)."""
    import onnx

    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    return np.frombuffer(stored_bytes(init, folder), dtype).reshape(list(init.dims))


def stored_slice(init, folder: Path, axis: int, start: int, stop: int) -> bytes:
    """The bytes of entries start:stop along `axis` of an initializer, in its own layout (axis 0 of any rank, packed
    4-bit rows included, or axis 1 of a 2-D one), reading only them from external data."""
    import onnx

    if init.data_location != onnx.TensorProto.EXTERNAL:
        return np.ascontiguousarray(np.take(stored_array(init, folder), np.arange(start, stop), axis=axis)).tobytes()
    path, offset, length = _location(init, folder)
    entries = int(init.dims[axis])
    with open(path, "rb") as f:
        if axis == 0:
            row = length // entries
            f.seek(offset + start * row)
            return f.read((stop - start) * row)
        item = length // (entries * int(init.dims[0]))
        parts = []
        for k in range(int(init.dims[0])):  # [K, V]: one read per row
            f.seek(offset + (k * entries + start) * item)
            parts.append(f.read((stop - start) * item))
    return b"".join(parts)


def stored_rows(init, folder: Path, axis: int, start: int, stop: int) -> np.ndarray:
    """Entries start:stop along `axis` (0 or 1) of an external 2-D initializer, as [stop - start, other] rows
    (axis 1 is read column block by column block, so a [W, V] table gives the same rows as its [V, W] twin)."""
    import onnx

    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
    rows, cols = init.dims
    path, offset, _ = _location(init, folder)
    if axis == 0:
        count = (stop - start) * cols
        return np.fromfile(path, dtype, count, offset=offset + start * cols * dtype.itemsize).reshape(-1, cols)
    out = np.empty((rows, stop - start), dtype)
    with open(path, "rb") as f:  # one read per row of the stored [rows, V] layout: V-long runs, never the table
        for k in range(rows):
            f.seek(offset + (k * cols + start) * dtype.itemsize)
            out[k] = np.frombuffer(f.read((stop - start) * dtype.itemsize), dtype)
    return np.ascontiguousarray(out.T)


class DataFile:
    """A new external-data file that initializers are appended to, one at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.size = 0

    def reserve(self, nbytes: int) -> int:
        """Room for `nbytes`; returns its offset (the caller writes there with os.pwrite)."""
        align = _ALIGN_LARGE if nbytes >= _LARGE else _ALIGN
        offset = -(-self.size // align) * align
        self.size = offset + nbytes
        return offset

    def point(self, init, offset: int, length: int) -> None:
        """Make `init` refer to bytes offset..offset+length of this file."""
        import onnx

        init.data_location = onnx.TensorProto.EXTERNAL
        init.ClearField("raw_data")
        del init.external_data[:]
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value

    def place(self, init, placed: Placed) -> None:
        """Make `init` the tensor the caller already wrote at `placed` (its bytes and full dims)."""
        self.point(init, placed.offset, placed.nbytes)
        del init.dims[:]
        init.dims.extend(placed.dims)

    def copy_in(self, init, folder: Path) -> None:
        """Append an external initializer's bytes (read from `folder`) in the kernel and point it here."""
        path, src_offset, length = _location(init, folder)
        offset = self.reserve(length)
        with open(path, "rb") as src:
            _copy(src.fileno(), src_offset, self.fd, offset, length)
        self.point(init, offset, length)

    def write(self, init, chunks, nbytes: int) -> None:
        """Append `nbytes` bytes, given as consecutive chunks, as the bytes of `init` and point it here."""
        offset = at = self.reserve(nbytes)
        for chunk in chunks:
            _write(self.fd, chunk, at)
            at += len(chunk)
        if at - offset != nbytes:
            raise EdgeMtpError(f"internal: tensor '{init.name}' got {at - offset} bytes instead of {nbytes}.")
        self.point(init, offset, nbytes)

    def close(self) -> None:
        """Close the file (its bytes are all written)."""
        os.close(self.fd)


def _write(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy(src: int, src_offset: int, dst: int, dst_offset: int, length: int) -> None:
    """Copy bytes between files in the kernel (no user-space buffer)."""
    while length:
        n = os.copy_file_range(src, dst, length, src_offset, dst_offset)
        if n <= 0:
            raise EdgeMtpError("internal: a graph's weight file is shorter than its graph says; please report it.")
        src_offset, dst_offset, length = src_offset + n, dst_offset + n, length - n
