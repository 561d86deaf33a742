"""A folder of images (optionally with class sub-folders and captions) as a dataset."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import torch
from PIL import ImageFile
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ldmkit.data.transforms import Background, load_image, resize_and_crop, to_tensor

__all__ = ["IMAGE_EXTENSIONS", "DatasetError", "ImageFolderDataset"]

log = logging.getLogger("ldmkit.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CAPTION_MODES = ("auto", "metadata", "sidecar", "none")
METADATA_FILE = "metadata.jsonl"
_MAX_LISTED = 20  # paths listed in one warning or error message


class DatasetError(ValueError):
    """A dataset cannot be used as given (missing folder, no images, bad metadata...)."""


def _listing(items: Sequence[str], sep: str = ", ") -> str:
    """Join up to ``_MAX_LISTED`` items, then say how many were left out."""
    shown = sep.join(items[:_MAX_LISTED])
    extra = len(items) - _MAX_LISTED
    return shown + (f"{sep}... and {extra} more" if extra > 0 else "")


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make PIL raise on truncated files instead of silently padding them."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _scan(root: Path, extensions: Iterable[str]) -> tuple[list[str], int]:
    """Return the sorted relative posix paths of candidate images and the number of files seen.

    Hidden files and folders (name starting with ".") are ignored.
    """
    exts = tuple(extensions)
    found, n_files = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        for name in filenames:
            if name.startswith("."):
                continue
            n_files += 1
            if name.lower().endswith(exts):
                found.append((rel_dir / name).as_posix())
    return sorted(found), n_files


def _read_metadata(path: Path) -> dict[str, str]:
    """Parse a Hugging Face style ``metadata.jsonl`` into ``{relative posix path: text}``."""
    captions: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}, line {lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}, line {lineno}: expected a JSON object")
        missing = [key for key in ("file_name", "text") if key not in entry]
        if missing:
            raise DatasetError(f"{path}, line {lineno}: missing key(s) {', '.join(missing)}")
        name, text = entry["file_name"], entry["text"]
        if not isinstance(name, str) or not isinstance(text, str):
            raise DatasetError(f"{path}, line {lineno}: file_name and text must be strings")
        captions[PurePosixPath(name.replace("\\", "/")).as_posix()] = text
    return captions


class ImageFolderDataset(Dataset):
    """Images found recursively under ``root``, resized and center-cropped to ``image_size``.

    Items are ``{"image": float32 [C, H, W] in [-1, 1], "text": str, "label": int}``.

    * Labels: when every image lives in a sub-folder, the first-level sub-folder names
      (sorted) are the classes (``class_names``); otherwise every label is -1 and
      ``class_names`` is empty.
    * Captions (``captions``): ``"metadata"`` reads ``root/metadata.jsonl`` (one JSON object
      per line with ``file_name`` relative to root and ``text``), ``"sidecar"`` reads
      ``name.txt`` next to ``name.png``, ``"none"`` gives ``""``; ``"auto"`` uses the
      metadata file if present, else sidecars.
    * With ``verify=True`` every file is fully decoded once at construction; unreadable,
      truncated or non-image files are skipped, listed in ``skipped`` (path, reason) and
      reported in one warning on the ``ldmkit.data`` logger.
    * ``cache=True`` keeps the decoded tensors in RAM (per process, so per DataLoader worker).

    Raises :class:`DatasetError` for a missing root, no readable images or bad metadata.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int = 32,
        *,
        channels: int = 3,
        center_crop: bool = True,
        background: Background = (255, 255, 255),
        captions: str = "auto",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        verify: bool = True,
        cache: bool = False,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise DatasetError(f"dataset folder {self.root} does not exist")
        if not self.root.is_dir():
            raise DatasetError(f"dataset path {self.root} is not a directory")
        if captions not in CAPTION_MODES:
            raise ValueError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
        if channels not in (1, 3) or image_size <= 0:
            raise ValueError(
                f"need channels in (1, 3) and image_size > 0, got {channels}, {image_size}"
            )
        self.image_size, self.channels = image_size, channels
        self.center_crop, self.background = center_crop, background
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None
        self._reported: set[int] = set()

        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        candidates, n_files = _scan(self.root, exts)
        metadata = self._load_metadata(captions, candidates, exts)

        # Classes come from all candidates, so labels do not shift when a file is unreadable.
        top = [PurePosixPath(p).parts for p in candidates]
        labelled = bool(candidates) and all(len(parts) > 1 for parts in top)
        self.class_names: list[str] = sorted({parts[0] for parts in top}) if labelled else []
        class_index = {name: i for i, name in enumerate(self.class_names)}

        self.skipped: list[tuple[str, str]] = []
        kept = self._verify(candidates) if verify else candidates
        if not kept:
            raise DatasetError(
                f"no readable images under {self.root}: saw {n_files} file(s), "
                f"{len(candidates)} with an image extension {exts}, "
                f"{len(self.skipped)} skipped as unreadable"
            )
        if metadata and not any(p in metadata for p in kept):
            raise DatasetError(
                f"all {len(metadata)} image(s) named in "
                f"{self.root / METADATA_FILE} were unreadable and skipped"
            )

        self.files: list[Path] = [self.root / p for p in kept]
        self.labels: list[int] = [class_index[p.split("/")[0]] if labelled else -1 for p in kept]
        if metadata is not None:
            unlisted = [p for p in kept if p not in metadata]
            if unlisted:
                log.warning(
                    "%d image(s) under %s have no entry in %s and get an empty caption: %s",
                    len(unlisted),
                    self.root,
                    METADATA_FILE,
                    _listing(unlisted),
                )
            self.captions = [metadata.get(p, "") for p in kept]
        elif captions in ("auto", "sidecar"):
            self.captions = [self._sidecar(f) for f in self.files]
        else:
            self.captions = [""] * len(kept)

    def _load_metadata(
        self, mode: str, candidates: list[str], exts: tuple[str, ...]
    ) -> dict[str, str] | None:
        """Read and check ``metadata.jsonl`` when the caption mode asks for it."""
        path = self.root / METADATA_FILE
        if mode == "metadata" and not path.is_file():
            raise DatasetError(f"captions='metadata' but {path} does not exist")
        if mode not in ("auto", "metadata") or not path.is_file():
            return None
        metadata = _read_metadata(path)
        known = set(candidates)
        missing = [name for name in metadata if name not in known]
        absent = [name for name in missing if not (self.root / name).is_file()]
        if absent:
            raise DatasetError(
                f"{path} names {len(absent)} file(s) that do not exist under {self.root}: "
                + _listing(absent)
            )
        if missing:
            raise DatasetError(
                f"{path} names {len(missing)} file(s) without an image extension {exts} "
                "(or hidden): " + _listing(missing)
            )
        return metadata

    def _verify(self, candidates: list[str]) -> list[str]:
        """Fully decode every candidate once; record and report the unreadable ones."""
        kept: list[str] = []
        with _strict_decoding():
            for rel in tqdm(
                candidates, desc="Checking images", unit="file", disable=len(candidates) < 200
            ):
                try:
                    if self._cache is not None:
                        self._cache[len(kept)] = self._decode(self.root / rel)
                    else:
                        load_image(
                            self.root / rel, channels=self.channels, background=self.background
                        )
                except Exception as exc:  # any decoding failure means "skip this file"
                    self.skipped.append((str(self.root / rel), f"{type(exc).__name__}: {exc}"))
                    continue
                kept.append(rel)
        if self.skipped:
            log.warning(
                "Skipped %d unreadable file(s) under %s:\n  %s",
                len(self.skipped),
                self.root,
                _listing([f"{path} ({reason})" for path, reason in self.skipped], sep="\n  "),
            )
        return kept

    @staticmethod
    def _sidecar(image_path: Path) -> str:
        """Caption from ``name.txt`` next to ``name.ext``, or ``""``."""
        txt = image_path.with_suffix(".txt")
        return txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""

    def _decode(self, path: Path) -> torch.Tensor:
        img = load_image(path, channels=self.channels, background=self.background)
        return to_tensor(resize_and_crop(img, self.image_size, center_crop=self.center_crop))

    def _image(self, index: int) -> torch.Tensor:
        if self._cache is None:
            return self._decode(self.files[index])
        if index not in self._cache:
            self._cache[index] = self._decode(self.files[index])
        return self._cache[index].clone()  # callers may modify the tensor in place

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        index = range(len(self.files))[index]  # normalises negatives, raises IndexError
        # A file that became unreadable after construction (or with verify=False) is
        # reported once and replaced by the next readable one instead of crashing the run.
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                image = self._image(i)
            except Exception as exc:
                if i not in self._reported:
                    self._reported.add(i)
                    log.warning("Cannot read %s (%s); using the next image", self.files[i], exc)
                continue
            return {"image": image, "text": self.captions[i], "label": self.labels[i]}
        raise DatasetError(f"none of the {len(self.files)} images under {self.root} is readable")
