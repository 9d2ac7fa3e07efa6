"""Archives: a zip of one DICOM series, extracted with bounds on size, entries, depth and paths."""

from __future__ import annotations

import lzma
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from serve.errors import CorruptFileError, UnsupportedFormatError, VolumeTooLargeError
from serve.imaging.itk import read_dicom_dir
from serve.imaging.volume import (DEFAULT_MAX_VOXELS, DEFAULT_MAX_ZIP_BYTES, MAX_ZIP_DEPTH, MAX_ZIP_ENTRIES,
                                  Volume)


def safe_extract_zip(path: Path, dest: Path, max_bytes: int = DEFAULT_MAX_ZIP_BYTES) -> None:
    """Extract ``path`` into ``dest``, refusing path traversal, links and more than ``max_bytes``."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:  # ValueError: a UTF-8 flagged name that is not
        raise CorruptFileError(f"not a readable zip archive ({e})") from e
    except NotImplementedError as e:  # e.g. "zip file version 11.5"
        raise UnsupportedFormatError(f"the zip archive needs a feature this server cannot read ({e}); zip the "
                                     f"series again with a standard zip tool (deflate, no password)") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            raise VolumeTooLargeError(f"the zip holds {len(infos)} entries, more than {MAX_ZIP_ENTRIES}")
        declared = sum(i.file_size for i in infos)
        if declared > max_bytes:
            raise VolumeTooLargeError(f"the zip expands to {declared} bytes, more than the limit of {max_bytes}")
        root = dest.resolve()
        written = 0
        for info in infos:
            name = info.filename.replace("\\", "/")
            if not name:  # zipfile's own is_dir() would fail with IndexError
                raise CorruptFileError("the zip contains an entry without a name; the archive is corrupt")
            parts = PurePosixPath(name).parts
            if name.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
                raise CorruptFileError(f"the zip contains an unsafe path ({name!r}); archives must only hold "
                                       f"relative paths inside the archive")
            if len(parts) - 1 > MAX_ZIP_DEPTH:
                raise CorruptFileError(f"the zip nests an entry {len(parts) - 1} folders deep, more than "
                                       f"{MAX_ZIP_DEPTH}; zip the series folder itself")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise CorruptFileError("the zip contains a symbolic link; archives must only hold plain files")
            if info.is_dir():
                continue
            target = (root / name).resolve()
            if root not in target.parents:
                raise CorruptFileError(f"the zip contains an unsafe path ({name!r})")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    # count real bytes: a forged size field must not let a bomb through
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise VolumeTooLargeError(f"the zip expands to more than {max_bytes} bytes")
                        dst.write(chunk)
            except (NotImplementedError, RuntimeError) as e:
                # zipfile's words for encryption and compression methods it lacks; RuntimeError's text
                # names the entry, which may hold PHI, so it is not repeated
                raise UnsupportedFormatError("a zip entry is encrypted or uses a compression method this server "
                                             "cannot read; zip the series again with a standard zip tool "
                                             "(deflate, no password)") from e
            except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError) as e:
                # ValueError: a local header flags its name as UTF-8 and it is not
                raise CorruptFileError(f"the zip archive is truncated or corrupt ({type(e).__name__})") from e


def read_dicom_zip(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS,
                   max_extract_bytes: int = DEFAULT_MAX_ZIP_BYTES) -> Volume:
    tmp = Path(tempfile.mkdtemp(prefix="mriseg-dcm-"))
    try:
        safe_extract_zip(path, tmp, max_extract_bytes)
        return read_dicom_dir(tmp, max_voxels)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
