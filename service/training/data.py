"""The training data: a folder or a .zip of pixel-art portraits with optional `.txt` captions beside them.

Every file is checked before any model is loaded, and a bad one is refused with its name: archive members that
climb out of the archive (`../`, absolute paths), links, zip bombs (a member larger than declared, or than the
caps below, or compressed too well to be an image), files that are neither images nor captions, captions without
an image, images too large to decode (checked on the header, before Pillow decodes them), and images that are no
24x24 pixel art: a 24x24 image must have a small palette; a larger square image must be snapped by the snapper
(service/pixelart.py) onto a 24x24 grid that its verdict calls pixel art. Nothing is extracted to disk.
"""

import io
import os
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.pixelart import MAX_PALETTE_SIZE, MIN_EDGE_ALIGNMENT, MIN_GRID_FIT, to_pixel_art
from service.training.captions import write_caption

GRID = 24
IMAGE_SUFFIXES = (".png", ".gif", ".bmp", ".webp", ".jpg", ".jpeg")
CAPTION_SUFFIX = ".txt"
IGNORED = ("__MACOSX/", ".DS_Store", "Thumbs.db")  # what archivers and file browsers add on their own
MIN_SNAP_SIDE = 4 * GRID  # a larger image needs cells of a few pixels for the snapper to find them
MAX_FILES = 5000
MAX_FILE_BYTES = 16 * 2**20
MAX_TOTAL_BYTES = 512 * 2**20
MAX_RATIO = 200  # uncompressed / compressed size of a member above RATIO_FROM_BYTES: images hardly compress
RATIO_FROM_BYTES = 2**20
MAX_IMAGE_PIXELS = 4096 * 4096  # checked on the header; Pillow's own bomb check is far higher (89 M pixels)
MAX_CAPTION_CHARS = 2000


class TrainingDataError(ValueError):
    """The data cannot be trained on; the message names the file and says why."""


@dataclass(frozen=True)
class Example:
    name: str  # path inside the data, without the suffix: where its caption is saved
    sprite: Image.Image  # 24x24 RGB
    caption: str
    caption_written: bool  # True: the data had no caption for it, captions.write_caption wrote one


def read_dataset(path: Path, subject: str) -> list[Example]:
    """Every portrait in the folder or .zip at `path` with its caption (written from the sprite where missing,
    naming `subject`), sorted by name."""
    files = dict(_read_files(path))
    images = {_stem(name): name for name in files if name.lower().endswith(IMAGE_SUFFIXES)}
    captions = {_stem(name): name for name in files if name.lower().endswith(CAPTION_SUFFIX)}
    for name in files:
        if not name.lower().endswith((*IMAGE_SUFFIXES, CAPTION_SUFFIX)):
            raise TrainingDataError(
                f"{name}: neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a {CAPTION_SUFFIX} caption"
            )
    if len(images) < sum(name.lower().endswith(IMAGE_SUFFIXES) for name in files):
        twins = sorted(name for name in files if name.lower().endswith(IMAGE_SUFFIXES) and images[_stem(name)] != name)
        raise TrainingDataError(f"{twins[0]}: another image has the same name; which one would its caption describe?")
    if orphans := sorted(set(captions) - set(images)):
        raise TrainingDataError(f"{captions[orphans[0]]}: a caption without an image (expected {orphans[0]}.png)")
    if not images:
        raise TrainingDataError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the data")
    examples = []
    for stem in sorted(images):
        sprite = to_sprite(images[stem], files[images[stem]])
        caption = _caption(captions[stem], files[captions[stem]]) if stem in captions else ""
        written = not caption
        examples.append(Example(stem, sprite, caption or write_caption(sprite, subject), written))
    return examples


def to_sprite(name: str, data: bytes) -> Image.Image:
    """The 24x24 RGB sprite of an image file; TrainingDataError naming it when it is none."""
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as error:
        raise TrainingDataError(f"{name}: not a readable image ({error})") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise TrainingDataError(f"{name}: {width}x{height} px is too large (at most {MAX_IMAGE_PIXELS} pixels)")
    if width != height or (width != GRID and width < MIN_SNAP_SIDE):
        raise TrainingDataError(
            f"{name}: {width}x{height} px; expected a {GRID}x{GRID} sprite or a square pixel-art image of at least "
            f"{MIN_SNAP_SIDE}x{MIN_SNAP_SIDE} px"
        )
    try:
        rgba = image.convert("RGBA")
    except OSError as error:
        raise TrainingDataError(f"{name}: not a readable image ({error})") from None
    if np.asarray(rgba)[..., 3].min() < 255:
        raise TrainingDataError(f"{name}: has transparent pixels; give the portrait an opaque background")
    if width == GRID:
        sprite = rgba.convert("RGB")
        colours = len(sprite.getcolors(GRID * GRID) or ())
        if colours > MAX_PALETTE_SIZE:
            raise TrainingDataError(
                f"{name}: not pixel art: {colours} colours in 24x24 pixels (pixel art has at most {MAX_PALETTE_SIZE})"
            )
        return sprite
    art = to_pixel_art(rgba.convert("RGB"), grid=GRID, size=GRID)
    quality = art.quality
    if not quality.is_pixel_art:
        raise TrainingDataError(
            f"{name}: not pixel art on a {GRID}x{GRID} grid: the snapper finds grid fit {quality.grid_fit:.2f} "
            f"(needs {MIN_GRID_FIT}), edge alignment {quality.edge_alignment:.2f} (needs {MIN_EDGE_ALIGNMENT}), "
            f"{quality.palette_size} colours (at most {MAX_PALETTE_SIZE})"
        )
    return art.sprite


def _caption(name: str, data: bytes) -> str:
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise TrainingDataError(f"{name}: not UTF-8 text") from None
    if len(text) > MAX_CAPTION_CHARS:
        raise TrainingDataError(f"{name}: {len(text)} characters; a caption has at most {MAX_CAPTION_CHARS}")
    return " ".join(text.split())


def _stem(name: str) -> str:
    return str(PurePosixPath(name).with_suffix(""))


def _read_files(path: Path) -> Iterator[tuple[str, bytes]]:
    if path.is_dir():
        yield from _folder_files(path)
    elif path.is_file() and zipfile.is_zipfile(path):
        yield from _zip_files(path)
    elif path.exists():
        raise TrainingDataError(f"{path}: expected a folder or a .zip of portraits")
    else:
        raise TrainingDataError(f"{path}: not found")


def _folder_files(folder: Path) -> Iterator[tuple[str, bytes]]:
    total = count = 0
    for root, dirs, names in os.walk(folder):
        for entry in dirs + names:
            if (Path(root) / entry).is_symlink():
                raise TrainingDataError(
                    f"{(Path(root) / entry).relative_to(folder)}: a link; put the file itself in the data"
                )
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _ignored(d + "/"))
        for entry in sorted(names):
            path = Path(root) / entry
            name = path.relative_to(folder).as_posix()
            if _ignored(name) or entry.startswith("."):
                continue
            total = _check_size(name, path.stat().st_size, total, count)
            count += 1
            yield name, path.read_bytes()


def _zip_files(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise TrainingDataError(f"{path}: not a readable zip ({error})") from None
    with archive:
        members = archive.infolist()
        if len(members) > MAX_FILES:
            raise TrainingDataError(f"{path}: {len(members)} members; at most {MAX_FILES}")
        total = count = 0
        for member in members:
            name = member.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise TrainingDataError(f"{name}: a member path outside the archive; refused")
            if stat.S_ISLNK(member.external_attr >> 16):
                raise TrainingDataError(f"{name}: a link; put the file itself in the archive")
            if member.is_dir() or _ignored(name) or PurePosixPath(name).name.startswith("."):
                continue
            total = _check_size(name, member.file_size, total, count)
            count += 1
            if member.file_size > RATIO_FROM_BYTES and member.file_size > MAX_RATIO * max(1, member.compress_size):
                raise TrainingDataError(
                    f"{name}: compressed {member.file_size // max(1, member.compress_size)}:1; "
                    "an image does not compress like that (a zip bomb?)"
                )
            try:
                with archive.open(member) as file:
                    data = file.read(member.file_size + 1)
            except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as error:
                raise TrainingDataError(f"{name}: cannot be read from the archive ({error})") from None
            if len(data) != member.file_size:
                raise TrainingDataError(f"{name}: holds more or less than its declared {member.file_size} bytes")
            yield name, data


def _check_size(name: str, size: int, total: int, count: int) -> int:
    if count >= MAX_FILES:
        raise TrainingDataError(f"{name}: more than {MAX_FILES} files in the data")
    if size > MAX_FILE_BYTES:
        raise TrainingDataError(f"{name}: {size} bytes; a portrait or caption has at most {MAX_FILE_BYTES}")
    if total + size > MAX_TOTAL_BYTES:
        raise TrainingDataError(f"{name}: the data grows past {MAX_TOTAL_BYTES} bytes uncompressed")
    return total + size


def _ignored(name: str) -> bool:
    return name.startswith(IGNORED[0]) or PurePosixPath(name).name in IGNORED[1:]
