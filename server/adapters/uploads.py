"""Turn an upload (loose files or one .tar.gz/.zip archive) into a staging folder, safely.

Nothing is ever unpickled, followed (symlinks, hard links) or written outside the staging folder, and an
archive may not expand beyond a fixed budget (decompression bombs).
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from quiver.adapters.validation import PICKLE_SUFFIXES, STORED_FILES, AdmissionError, UploadTooLarge

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_MAX_ARCHIVE_MEMBERS = 64
_CHUNK = 1024 * 1024


def _refuse(code: str, message: str) -> AdmissionError:
    return AdmissionError(code, message, param="files")


def _too_large() -> AdmissionError:
    return UploadTooLarge("archive_too_large", "the archive expands beyond the upload size limit", param="files")


def _is_archive(filename: str) -> bool:
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


def _check_member_name(raw_name: str, documents: tuple[str, ...] = ()) -> str | None:
    """The stored file name for an upload or archive member, None if it is to be ignored."""
    if "\x00" in raw_name or "\\" in raw_name:
        raise _refuse("unsafe_file_name", f"file name {raw_name!r} is not allowed")
    path = PurePosixPath(raw_name)
    if path.is_absolute() or ".." in path.parts:
        raise _refuse("unsafe_file_name", f"file name {raw_name!r} points outside the adapter folder")
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        raise _refuse(
            "pickle_not_allowed",
            f"{path.name} is a pickle file; pickles can run code when loaded, so only safetensors are accepted",
        )
    return path.name if path.name in STORED_FILES or path.name in documents else None


def _charge(budget: list[int], size: int) -> None:
    """Counts bytes an archive expands to against the budget, kept or skipped: a skipped member of a
    compressed tar is still decompressed to get past it."""
    budget[0] -= max(size, 0)
    if budget[0] < 0:
        raise _too_large()


def _copy_capped(source: BinaryIO, target: Path, budget: list[int]) -> None:
    with open(target, "wb") as out:
        while chunk := source.read(_CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise _too_large()
            out.write(chunk)


def _place(name: str | None, source: BinaryIO, staging: Path, budget: list[int]) -> None:
    if name is None:
        return
    target = staging / name
    if target.exists():
        raise _refuse("duplicate_file", f"{name} appears more than once in the upload")
    _copy_capped(source, target, budget)


def _extract_zip(archive: BinaryIO, staging: Path, budget: list[int], documents: tuple[str, ...]) -> None:
    try:
        bundle = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise _refuse("invalid_archive", "the .zip archive cannot be read") from None
    with bundle:
        members = bundle.infolist()
        if len(members) > _MAX_ARCHIVE_MEMBERS:
            raise _refuse("invalid_archive", f"the archive has more than {_MAX_ARCHIVE_MEMBERS} members")
        # Every member's declared size counts before anything is read; a member's copy may not exceed its
        # declared size (zipfile also stops there and checks the CRC), so a lie gains nothing.
        for member in members:
            _charge(budget, member.file_size)
        for member in members:
            mode = member.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise _refuse("unsafe_archive", f"archive member {member.filename!r} is a symbolic link")
            if member.is_dir():
                _check_member_name(member.filename)
                continue
            name = _check_member_name(member.filename, documents)
            if name is not None:
                with bundle.open(member) as source:
                    _place(name, source, staging, [member.file_size])  # already charged


def _extract_tar(archive: BinaryIO, staging: Path, budget: list[int], documents: tuple[str, ...]) -> None:
    try:
        bundle = tarfile.open(fileobj=archive, mode="r:*")
    except (tarfile.TarError, OSError, EOFError):
        raise _refuse("invalid_archive", "the tar archive cannot be read") from None
    with bundle:
        try:
            for count, member in enumerate(bundle, start=1):
                if count > _MAX_ARCHIVE_MEMBERS:
                    raise _refuse("invalid_archive", f"the archive has more than {_MAX_ARCHIVE_MEMBERS} members")
                if member.issym() or member.islnk():
                    raise _refuse("unsafe_archive", f"archive member {member.name!r} is a link")
                if not (member.isfile() or member.isdir()):
                    raise _refuse("unsafe_archive", f"archive member {member.name!r} is not a regular file")
                name = _check_member_name(member.name, documents)
                # The stream decompresses every member's data to move past it, kept or not: count it first.
                _charge(budget, member.size)
                if member.isfile() and name is not None:
                    source = bundle.extractfile(member)
                    assert source is not None
                    _place(name, source, staging, [member.size])  # already charged; the copy stops at its size
        except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile):
            raise _refuse("invalid_archive", "the tar archive is corrupt or truncated") from None


def stage_upload(files: list[tuple[str, BinaryIO]], staging: Path, max_bytes: int,
                 documents: tuple[str, ...] = ()) -> None:
    """Write the upload's adapter files into `staging`; raises AdmissionError for anything unsafe. An archive's
    members named in `documents` (a `suite.json`) are staged too, for the caller to take out."""
    if not files:
        raise _refuse("missing_files", "upload the adapter files (or one .tar.gz/.zip archive) as `files`")
    budget = [max_bytes]
    archives = [name for name, _ in files if _is_archive(name)]
    if archives:
        if len(files) != 1:
            raise _refuse("invalid_archive", "upload either one archive or loose adapter files, not both")
        filename, source = files[0]
        _check_member_name(filename)
        extract = _extract_zip if filename.lower().endswith(".zip") else _extract_tar
        extract(source, staging, budget, documents)
        return
    for filename, source in files:
        _place(_check_member_name(filename), source, staging, budget)
