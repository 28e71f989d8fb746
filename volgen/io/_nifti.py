"""Checks of NIfTI files that ITK's reader does not make.

ITK's NIfTI reader (i) reads a truncated file without complaint, filling the missing voxels, (ii) reads
truncated or corrupt gzip data without complaint, and (iii) turns NaN and +-Inf voxels into 0. volgen
wants an error for all three, so it parses the header itself and scans the data once (decompressing
``.nii.gz``) before ITK reads the file.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from volgen.errors import InputError
from volgen.io._common import ORTHONORMAL_TOLERANCE, check_voxel_count

_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of real floating-point voxels
_CHUNK = 1 << 22


#: Bits per voxel of each NIfTI datatype code (the header's ``bitpix`` must agree).
_BITPIX = {
    2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 1024: 64, 1280: 64,
    1536: 128, 1792: 128, 2048: 256, 2304: 32,
}  # fmt: skip


class NiftiHeader(NamedTuple):
    """The fields of a NIfTI-1/2 header that matter for checking the file."""

    dims: tuple[int, ...]
    datatype: int
    bitpix: int
    vox_offset: float
    single_file: bool
    endian: str
    pixdim: tuple[float, ...]
    sform_code: int
    srow: tuple[float, ...]
    qoffset: tuple[float, ...]


def parse_header(header: bytes) -> NiftiHeader | None:
    """Parse the first 540 bytes of a NIfTI-1 or NIfTI-2 file; None if they are not a NIfTI header."""
    if len(header) < 348:
        return None
    for endian in "<>":
        sizeof_hdr = struct.unpack(f"{endian}i", header[:4])[0]
        if sizeof_hdr == 348:
            magic = header[344:347]
            if magic not in (b"n+1", b"ni1"):
                return None
            dim = struct.unpack(f"{endian}8h", header[40:56])
            datatype, bitpix = struct.unpack(f"{endian}2h", header[70:74])
            pixdim = struct.unpack(f"{endian}8f", header[76:108])
            vox_offset = struct.unpack(f"{endian}f", header[108:112])[0]
            sform_code = struct.unpack(f"{endian}h", header[254:256])[0]
            qoffset = struct.unpack(f"{endian}3f", header[268:280])
            srow = struct.unpack(f"{endian}12f", header[280:328])
            single = magic == b"n+1"
            break
        if sizeof_hdr == 540 and len(header) >= 540:
            datatype, bitpix = struct.unpack(f"{endian}2h", header[12:16])
            dim = struct.unpack(f"{endian}8q", header[16:80])
            pixdim = struct.unpack(f"{endian}8d", header[104:168])
            vox_offset = float(struct.unpack(f"{endian}q", header[168:176])[0])
            sform_code = struct.unpack(f"{endian}i", header[348:352])[0]
            qoffset = struct.unpack(f"{endian}3d", header[376:400])
            srow = struct.unpack(f"{endian}12d", header[400:496])
            single = header[4:7] == b"n+2"
            break
    else:
        return None
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        return None
    return NiftiHeader(
        dims=tuple(int(d) for d in dim[1 : ndim + 1]),
        datatype=int(datatype),
        bitpix=int(bitpix),
        vox_offset=float(vox_offset),
        single_file=single,
        endian=endian,
        pixdim=tuple(float(v) for v in pixdim[1 : min(ndim, 3) + 1]),
        sform_code=int(sform_code),
        srow=tuple(float(v) for v in srow),
        qoffset=tuple(float(v) for v in qoffset),
    )


def check_header(path: Path, header: NiftiHeader) -> None:
    """Refuse a NIfTI header that ITK would read wrongly without complaint.

    Raises:
        InputError: non-finite or negative data offset; ``bitpix`` that disagrees with ``datatype``;
            non-finite voxel sizes or offsets; an sform (used by ITK) whose axes are not orthogonal.
    """
    if not math.isfinite(header.vox_offset) or header.vox_offset < 0:
        raise InputError(path, f"NIfTI data offset (vox_offset) is {header.vox_offset}; corrupt header")
    expected = _BITPIX.get(header.datatype)
    if expected is None:
        raise InputError(path, f"unknown NIfTI datatype code {header.datatype}; corrupt header")
    if header.bitpix != expected:
        raise InputError(
            path,
            f"NIfTI header is inconsistent: bitpix {header.bitpix} but datatype {header.datatype} has "
            f"{expected} bits per voxel",
        )
    if not all(math.isfinite(v) for v in (*header.pixdim, *header.qoffset)):
        raise InputError(path, "header holds NaN/Inf in its geometry (pixdim or qoffset)")
    if header.sform_code > 0:
        if not all(math.isfinite(v) for v in header.srow):
            raise InputError(path, "header holds NaN/Inf in its geometry (sform)")
        matrix = np.asarray(header.srow, dtype=np.float64).reshape(3, 4)[:, :3]
        spacing = np.linalg.norm(matrix, axis=0)
        if (spacing > 0).all():
            direction = matrix / spacing
            error = float(np.abs(direction.T @ direction - np.eye(3)).max())
            if error > ORTHONORMAL_TOLERANCE:
                raise InputError(
                    path,
                    f"NIfTI sform axes are not orthogonal (off by {error:.2g}; a sheared grid); volgen does "
                    "not straighten it silently: resample the volume to an orthogonal grid first",
                )


def read_header(path: Path, header_bytes: bytes) -> NiftiHeader:
    """Parse and check the header (first 540 bytes) of ``path``, data sizes included; nothing else is read.

    Raises:
        InputError: Not NIfTI, a header :func:`check_header` refuses, an empty or oversized image.
    """
    header = parse_header(header_bytes)
    if header is None:
        raise InputError(path, "not a valid NIfTI file (corrupt header)")
    check_header(path, header)
    check_voxel_count(path, header.dims)
    return header


def check_nifti(path: Path, *, gz: bool) -> bool:
    """Check a ``.nii``/``.nii.gz`` file: header, sizes, complete data, intact gzip stream.

    Args:
        path: The file.
        gz: Whether it is gzip-compressed (``.nii.gz``).

    Returns:
        Whether the data holds NaN or +-Inf (which ITK would silently read as 0).

    Raises:
        InputError: "corrupt gzip data", "not a valid NIfTI file", "empty image", "header claims N
            voxels", "NIfTI image data is truncated".
    """
    try:
        opener = gzip.open if gz else open
        with opener(path, "rb") as f:
            header_bytes = f.read(540)
            header = read_header(path, header_bytes)
            if not header.single_file:
                return False  # a .hdr/.img pair written as .nii: ITK checks the data file
            float_code = _FLOAT_TYPES.get(header.datatype)
            dtype = np.dtype(header.endian + float_code) if float_code else None
            length, nonfinite = len(header_bytes), False
            if not gz and dtype is None:
                length = path.stat().st_size
            else:
                offset = int(header.vox_offset)
                pending = header_bytes[offset:] if len(header_bytes) > offset else b""
                skip = max(0, offset - len(header_bytes))
                while chunk := f.read(_CHUNK):
                    length += len(chunk)
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    if dtype is not None and not nonfinite:
                        pending += chunk
                        usable = len(pending) // dtype.itemsize * dtype.itemsize
                        nonfinite = not np.isfinite(np.frombuffer(pending[:usable], dtype=dtype)).all()
                        pending = pending[usable:]
    except (OSError, EOFError, zlib.error) as exc:
        if gz:
            raise InputError(path, "corrupt gzip data (damaged or truncated .gz file)") from exc
        raise InputError(path, f"cannot read the file ({exc})") from exc
    expected = int(header.vox_offset) + int(np.prod(header.dims, dtype=np.int64)) * header.bitpix // 8
    if length < expected:
        raise InputError(path, f"NIfTI image data is truncated ({length} of {expected} bytes)")
    return nonfinite
