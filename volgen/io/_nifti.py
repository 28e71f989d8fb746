"""Checks of NIfTI files that ITK's reader does not make.

ITK's NIfTI reader (i) reads a truncated file without complaint, filling the missing voxels, (ii) reads
truncated or corrupt gzip data without complaint, and (iii) turns NaN and +-Inf voxels into 0. volgen
wants an error for all three, so it parses the header itself and scans the data once (decompressing
``.nii.gz``) before ITK reads the file.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from volgen.errors import InputError
from volgen.io._common import check_voxel_count

_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of real floating-point voxels
_CHUNK = 1 << 22


class NiftiHeader(NamedTuple):
    """The fields of a NIfTI-1/2 header that matter for checking the data."""

    dims: tuple[int, ...]
    datatype: int
    bitpix: int
    vox_offset: int
    single_file: bool
    endian: str


def parse_header(header: bytes) -> NiftiHeader | None:
    """Parse the first 540 bytes of a NIfTI-1 or NIfTI-2 file; None if they are not a NIfTI header."""
    if len(header) < 348:
        return None
    for endian in "<>":
        sizeof_hdr = struct.unpack(f"{endian}i", header[:4])[0]
        if sizeof_hdr == 348:
            dim = struct.unpack(f"{endian}8h", header[40:56])
            datatype, bitpix = struct.unpack(f"{endian}2h", header[70:74])
            vox_offset = int(struct.unpack(f"{endian}f", header[108:112])[0])
            magic = header[344:347]
            if magic not in (b"n+1", b"ni1"):
                return None
            single = magic == b"n+1"
            break
        if sizeof_hdr == 540 and len(header) >= 540:
            datatype, bitpix = struct.unpack(f"{endian}2h", header[12:16])
            dim = struct.unpack(f"{endian}8q", header[16:80])
            vox_offset = struct.unpack(f"{endian}q", header[168:176])[0]
            single = header[4:7] == b"n+2"
            break
    else:
        return None
    ndim = dim[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or vox_offset < 0:
        return None
    return NiftiHeader(
        dims=tuple(int(d) for d in dim[1 : ndim + 1]),
        datatype=int(datatype),
        bitpix=int(bitpix),
        vox_offset=int(vox_offset),
        single_file=single,
        endian=endian,
    )


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
            header = parse_header(header_bytes)
            if header is None:
                raise InputError(path, "not a valid NIfTI file (corrupt header)")
            check_voxel_count(path, header.dims)
            if not header.single_file:
                return False  # a .hdr/.img pair written as .nii: ITK checks the data file
            float_code = _FLOAT_TYPES.get(header.datatype)
            dtype = np.dtype(header.endian + float_code) if float_code else None
            length, nonfinite = len(header_bytes), False
            if not gz and dtype is None:
                length = path.stat().st_size
            else:
                pending = header_bytes[header.vox_offset :] if len(header_bytes) > header.vox_offset else b""
                skip = max(0, header.vox_offset - len(header_bytes))
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
    expected = header.vox_offset + int(np.prod(header.dims, dtype=np.int64)) * header.bitpix // 8
    if length < expected:
        raise InputError(path, f"NIfTI image data is truncated ({length} of {expected} bytes)")
    return nonfinite
