"""The data plan: what the driver learns about the data before any compute.

The driver only *lists* files (and, for Parquet, reads the schema, the label column and
the footer's null counts) to validate the data, fix the class map and split train/val;
image bytes are read and decoded by Ray Data tasks later (`jobs.data.pipeline`), never by
the driver.

What is refused up front (exit 2, naming the file): ImageFolder images that are empty (0
bytes), not regular files (a FIFO, a device, a broken symlink) or class directories that
are symlinks back to the tree itself (a cycle); Parquet columns of a type tlctl does not
read (anything that could unpickle, lists, structs or floats as labels), null labels or
images, and splits that leave no training or no validation rows.

ImageFolder naming: every directory directly under the root is a class, including ones
whose names start with `_`; hidden ones (`.git`, `.ipynb_checkpoints`, ...) and
`__MACOSX` (left by macOS zip archives) are skipped, as are hidden files. Only files
directly inside a class directory count; a local tree is listed two levels deep, never
recursively, so symlinks below the class level cannot make the listing loop.
"""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from jobs.errors import TlctlError
from jobs.spec.model import DataSpec
from jobs.storage.location import Location, describe_error, resolve

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
PARQUET_EXTENSIONS = (".parquet", ".pq")
# Directories directly under an ImageFolder root that are not classes (besides hidden ones).
SKIPPED_DIRS = ("__MACOSX",)
# How many offending files a message names before it says "and N more".
NAMED_LIMIT = 5
_EXTENSION_KEY = b"ARROW:extension:name"
VALID_LABEL_TYPES = "string, integer, or dictionary of strings"
VALID_IMAGE_TYPES = "binary, large_binary, or a struct with a binary 'bytes' field"


@dataclass
class Split:
    """One side of the data (train or val): where it lives and what it holds."""

    kind: str  # "imagefolder" | "parquet"
    location: Location
    files: list[str] = field(default_factory=list)  # image paths (imagefolder) or parquet files
    labels: list[int] = field(default_factory=list)  # per image (imagefolder only)
    rows: int = 0


@dataclass
class DataPlan:
    """What the driver learned about the data before any compute: classes and splits."""

    classes: list[str]
    train: Split
    val: Split | None  # None: val_fraction of train, split inside Ray Data (Parquet)
    val_fraction: float
    seed: int
    image_column: str = "image"  # Parquet only
    label_column: str = "label"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_rows(self) -> int:
        """Images trained on per epoch (Parquet without `val` gives up val_fraction)."""
        if self.val is None:
            return parquet_split_rows(self.train.rows, self.val_fraction)[0]
        return self.train.rows


def parquet_split_rows(rows: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) rows of Ray Data's `train_test_split(test_size=val_fraction)`: it keeps
    `int(rows * (1 - val_fraction))` rows for training and the rest for validation."""
    train = int(rows * (1 - val_fraction))
    return train, rows - train


def _file_infos(loc: Location, recursive: bool) -> list[pafs.FileInfo]:
    try:
        return loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=recursive))
    except FileNotFoundError as exc:
        raise TlctlError(f"{loc.uri}: no such directory") from exc
    except OSError as exc:
        raise describe_error(exc, loc) from exc


def _kind_of(loc: Location, field_name: str) -> str:
    try:
        info = loc.fs.get_file_info(loc.path)
    except OSError as exc:
        raise describe_error(exc, loc) from exc
    if info.type == pafs.FileType.NotFound:
        raise TlctlError(f"{field_name}: {loc.uri} does not exist")
    if info.type == pafs.FileType.File:
        if loc.path.endswith(PARQUET_EXTENSIONS):
            return "parquet"
        raise TlctlError(
            f"{field_name}: {loc.uri} is a file but not Parquet "
            f"(valid: an ImageFolder directory root/<class>/*.png|jpg, or a .parquet file/dir)"
        )
    if info.type != pafs.FileType.Directory:
        raise TlctlError(
            f"{field_name}: {loc.uri} is neither a regular file nor a directory "
            f"(valid: an ImageFolder directory root/<class>/*.png|jpg, or a .parquet file/dir)"
        )
    children = _file_infos(loc, recursive=False)
    if any(c.type == pafs.FileType.File and c.path.endswith(PARQUET_EXTENSIONS) for c in children):
        return "parquet"
    return "imagefolder"


# --- listing ------------------------------------------------------------------------------
# (class, file name or None for the class directory itself, path, kind, size); kind is
# "file", "directory" or what else the entry is ("a FIFO", "a broken symlink", ...).
Entry = tuple[str, str | None, str, str, int | None]


def _scandir(path: str, field_name: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise TlctlError(f"{field_name}: cannot list {path} ({exc.strerror or exc})") from exc


def _local_kind(path: str) -> tuple[str, int | None]:
    """What a local path is once symlinks are followed, without opening it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "a broken symlink", None
    except OSError as exc:  # ELOOP: a symlink chain that loops
        return f"unreadable: {exc.strerror or exc}", None
    if stat.S_ISREG(st.st_mode):
        return "file", st.st_size
    if stat.S_ISDIR(st.st_mode):
        return "directory", None
    if stat.S_ISFIFO(st.st_mode):
        return "a FIFO", None
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return "a device", None
    if stat.S_ISSOCK(st.st_mode):
        return "a socket", None
    return "not a regular file", None


def _is_cycle(path: str, root: str) -> bool:
    """Whether directory `path` resolves to `root` or to a directory above it."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, real_root]) == real


def _cycle_error(field_name: str, path: str, root: str) -> TlctlError:
    return TlctlError(
        f"{field_name}: {path} is a symlink to {os.path.realpath(path)}, which contains "
        f"{root} (a directory cycle); remove the link or point it at a directory of its own"
    )


def _local_listing(loc: Location, field_name: str) -> Iterator[Entry]:
    """A local ImageFolder tree, two levels deep (never recursive: no symlink can loop)."""
    root = loc.path
    for top in _scandir(root, field_name):
        if _skipped_dir(top.name) or _local_kind(top.path)[0] != "directory":
            continue
        if _is_cycle(top.path, root):
            raise _cycle_error(field_name, top.path, root)
        yield top.name, None, top.path, "directory", None
        for entry in _scandir(top.path, field_name):
            kind, size = _local_kind(entry.path)
            yield top.name, entry.name, entry.path, kind, size


def _remote_listing(loc: Location) -> Iterator[Entry]:
    """An object-store ImageFolder tree in one recursive listing (no symlinks there)."""
    base = loc.path.rstrip("/")
    for info in _file_infos(loc, recursive=True):
        rel = info.path[len(base) + 1 :] if info.path.startswith(base + "/") else info.path
        parts = rel.split("/")
        if info.type == pafs.FileType.Directory and len(parts) == 1:
            yield parts[0], None, info.path, "directory", None
        elif len(parts) == 2:
            kind = {pafs.FileType.File: "file", pafs.FileType.Directory: "directory"}.get(
                info.type, "not a regular file"
            )
            yield parts[0], parts[1], info.path, kind, info.size


def _skipped_dir(name: str) -> bool:
    return name.startswith(".") or name in SKIPPED_DIRS


def _named(paths: list[str]) -> str:
    shown = ", ".join(paths[:NAMED_LIMIT])
    return shown + (f" and {len(paths) - NAMED_LIMIT} more" if len(paths) > NAMED_LIMIT else "")


def scan_imagefolder(loc: Location, field_name: str) -> tuple[list[str], dict[str, list[str]]]:
    """List `root/<class>/<image>`: returns sorted class names and the images of each.

    Every directory directly under the root is a class (`_`-prefixed ones too); hidden
    ones and __MACOSX are skipped, as are hidden files and files of other extensions.
    """
    by_class: dict[str, list[str]] = {}
    empty: list[str] = []
    odd: list[str] = []
    listing = _remote_listing(loc) if loc.is_s3 else _local_listing(loc, field_name)
    for cls, name, path, kind, size in listing:
        if _skipped_dir(cls):
            continue
        if name is None:
            by_class.setdefault(cls, [])
            continue
        if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        if kind == "directory":
            continue  # only files directly in a class directory are its images
        if kind != "file":
            odd.append(f"{path} ({kind})")
        elif size == 0:
            empty.append(path)
        else:
            by_class.setdefault(cls, []).append(path)
    if odd:
        raise TlctlError(
            f"{field_name}: {len(odd)} image entr{'y is' if len(odd) == 1 else 'ies are'} "
            f"not regular files: {_named(odd)} (tlctl reads only regular image files; "
            "remove them or replace them with the images)"
        )
    if empty:
        raise TlctlError(
            f"{field_name}: {len(empty)} image file{' is' if len(empty) == 1 else 's are'} "
            f"empty (0 bytes): {_named(empty)} (remove them or copy them again)"
        )
    if not by_class:
        raise TlctlError(
            f"{field_name}: {loc.uri} has no class directories "
            "(expected an ImageFolder tree: root/<class>/*.png|jpg; every directory directly "
            "under the root is a class, except hidden ones (.name) and __MACOSX)"
        )
    empty_classes = sorted(c for c, files in by_class.items() if not files)
    if empty_classes:
        n = len(empty_classes)
        raise TlctlError(
            f"{field_name}: class director{'y' if n == 1 else 'ies'} "
            f"{', '.join(loc.join(c).uri for c in empty_classes)} "
            f"contain{'s' if n == 1 else ''} no images ({', '.join(IMAGE_EXTENSIONS)}; "
            "hidden files are skipped); every directory directly under the root is a class "
            "(also _-prefixed ones): add images, or remove it or rename it to start with '.'"
        )
    classes = sorted(by_class)
    if len(classes) < 2:
        raise TlctlError(
            f"{field_name}: {loc.uri} has only 1 class ({classes[0]}); "
            "a classifier needs at least 2 class directories"
        )
    return classes, {c: sorted(by_class[c]) for c in classes}


def parquet_files(loc: Location, field_name: str) -> list[str]:
    if loc.fs.get_file_info(loc.path).type == pafs.FileType.File:
        return [loc.path]
    if not loc.is_s3:
        return _local_parquet_files(loc.path, field_name)
    return sorted(
        i.path
        for i in _file_infos(loc, recursive=True)
        if i.type == pafs.FileType.File and i.path.endswith(PARQUET_EXTENSIONS)
    )


def _local_parquet_files(root: str, field_name: str) -> list[str]:
    """The Parquet files below a local directory; a symlink back up the tree is refused,
    one reaching a directory listed already is not listed twice."""
    found: list[str] = []
    odd: list[str] = []
    top = os.stat(root)
    seen = {(top.st_dev, top.st_ino)}

    def walk(path: str, ancestors: frozenset[tuple[int, int]]) -> None:
        for entry in _scandir(path, field_name):
            kind, _ = _local_kind(entry.path)
            if kind == "directory":
                st = os.stat(entry.path)
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    raise _cycle_error(field_name, entry.path, os.path.realpath(entry.path))
                if key not in seen:
                    seen.add(key)
                    walk(entry.path, ancestors | {key})
            elif entry.name.endswith(PARQUET_EXTENSIONS):
                if kind == "file":
                    found.append(entry.path)
                else:
                    odd.append(f"{entry.path} ({kind})")

    walk(root, frozenset(seen))
    if odd:
        raise TlctlError(
            f"{field_name}: {len(odd)} Parquet entr{'y is' if len(odd) == 1 else 'ies are'} "
            f"not regular files: {_named(odd)} (remove them or replace them with the files)"
        )
    return sorted(found)


# --- Parquet: types before values ----------------------------------------------------------


def _extension_name(f: pa.Field) -> str | None:
    """The Arrow extension type of a field, registered in this process or not."""
    if isinstance(f.type, pa.BaseExtensionType):
        return f.type.extension_name
    name = (f.metadata or {}).get(_EXTENSION_KEY)
    return name.decode(errors="replace") if name is not None else None


def type_text(f: pa.Field) -> str:
    name = _extension_name(f)
    if name is None:
        return str(f.type)
    storage = f.type.storage_type if isinstance(f.type, pa.BaseExtensionType) else f.type
    return f"extension<{name}> (stored as {storage})"


def is_plain_scalar(f: pa.Field) -> bool:
    t = f.type
    return _extension_name(f) is None and (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_null(t)
    )


def _label_kind(f: pa.Field) -> str | None:
    """ "integer" or "string" for a label column tlctl reads; None for any other type."""
    t = f.type
    if _extension_name(f) is not None:
        return None
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_dictionary(t) and (
        pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)
    ):
        return "string"
    return None


def image_leaf(f: pa.Field) -> str | None:
    """The Parquet leaf column holding the image bytes ("image" or "image.bytes"), or None
    when the column is not of a type tlctl reads images from."""
    t = f.type
    if _extension_name(f) is not None:
        return None
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return f.name
    if not pa.types.is_struct(t) or t.get_field_index("bytes") < 0:
        return None
    children = [t.field(i) for i in range(t.num_fields)]
    raw = t.field(t.get_field_index("bytes"))
    if not (pa.types.is_binary(raw.type) or pa.types.is_large_binary(raw.type)):
        return None
    if not all(is_plain_scalar(c) for c in children):
        return None
    return f"{f.name}.bytes"


def _null_count(pf: Any, leaf: str) -> int | None:
    """Nulls of a Parquet leaf column from the footer statistics (None: not recorded)."""
    meta = pf.metadata
    index = next((i for i in range(meta.num_columns) if meta.schema.column(i).path == leaf), None)
    if index is None:
        return None
    total = 0
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(index).statistics
        if stats is None or not stats.has_null_count:
            return None
        total += stats.null_count
    return total


def parquet_labels(
    loc: Location,
    files: list[str],
    image_column: str,
    label_column: str,
    field_name: str,
    keys: tuple[str, str] = ("data.image_column", "data.label_column"),
) -> list[Any]:
    """Every label of `files`, read only after each file's column types are checked: a
    column whose type could unpickle (Ray's `ray.data.arrow_pickled_object`, any extension
    type) or that tlctl does not read is refused before one value is read. `keys`: how
    messages name the two columns' settings (spec fields, or a command's flags)."""
    import pyarrow.parquet as pq

    image_key, label_key = keys

    labels: list[Any] = []
    kinds: dict[str, str] = {}  # label kind -> first file with it
    for path in files:
        try:
            with loc.fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                schema = pf.schema_arrow
                _check_columns(schema, path, image_column, label_column, keys)
                kind = _label_kind(schema.field(label_column))
                kinds.setdefault(kind, path)
                image_nulls = _null_count(pf, image_leaf(schema.field(image_column)))
                column = pf.read(columns=[label_column]).column(label_column)
        except TlctlError:
            raise
        except Exception as exc:  # any parquet failure names the file
            raise TlctlError(
                f"{field_name}: {path} is not a readable Parquet file ({exc})"
            ) from exc
        if column.null_count:
            raise TlctlError(
                f"{label_key}: column '{label_column}' in {path} has "
                f"{column.null_count} null label{'s' if column.null_count != 1 else ''} "
                f"of {len(column)} rows (every row needs a class: drop those rows or label them)"
            )
        if image_nulls:
            raise TlctlError(
                f"{image_key}: column '{image_column}' in {path} has {image_nulls} "
                f"null image{'s' if image_nulls != 1 else ''} of {len(column)} rows "
                "(every row needs image bytes: drop those rows)"
            )
        labels.extend(column.to_pylist())
    if len(kinds) > 1:
        raise TlctlError(
            f"{label_key}: column '{label_column}' holds integers in {kinds['integer']} "
            f"but strings in {kinds['string']} (all files must label classes the same way)"
        )
    return labels


def _check_columns(
    schema: pa.Schema, path: str, image_column: str, label_column: str, keys: tuple[str, str]
) -> None:
    """Both columns exist and have a type tlctl reads (checked on the schema alone)."""
    image_key, label_key = keys
    for column, key in ((image_column, image_key), (label_column, label_key)):
        if column not in schema.names:
            raise TlctlError(
                f"{key}: column '{column}' not in {path} (valid: {', '.join(schema.names)})"
            )
    label = schema.field(label_column)
    if _label_kind(label) is None:
        raise TlctlError(
            f"{label_key}: column '{label_column}' in {path} has type "
            f"{type_text(label)} (valid: {VALID_LABEL_TYPES})"
        )
    image = schema.field(image_column)
    if image_leaf(image) is None:
        raise TlctlError(
            f"{image_key}: column '{image_column}' in {path} has type "
            f"{type_text(image)} (valid: {VALID_IMAGE_TYPES}, as Ray and Hugging Face write "
            "images)"
        )


def label_names(values: Sequence[Any]) -> list[str]:
    """The class names of Parquet labels, as training names them (sorted, as text)."""
    uniq = sorted({v for v in values if v is not None}, key=lambda v: (str(type(v)), v))
    return [str(v) for v in uniq]


def stratified_split(
    files_by_class: dict[str, list[str]], val_fraction: float, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split each class with a fixed seed so reruns (and resumes) see the same val set."""
    rng = random.Random(seed)
    train: list[tuple[str, str]] = []
    val: list[tuple[str, str]] = []
    for cls in sorted(files_by_class):
        files = list(files_by_class[cls])
        rng.shuffle(files)
        n_val = int(round(len(files) * val_fraction))
        if val_fraction > 0 and len(files) >= 2:
            n_val = min(max(n_val, 1), len(files) - 1)
        val += [(f, cls) for f in files[:n_val]]
        train += [(f, cls) for f in files[n_val:]]
    rng.shuffle(train)  # class-mixed blocks: batches must not be runs of one class
    return train, val


def plan_data(data: DataSpec, *, endpoint: str | None, seed: int) -> DataPlan:
    """Validate the data section against what is really there; fix classes and splits.

    `endpoint` is the one the data is read through (JobSpec.data_endpoint).
    """
    train_loc = resolve(data.train, endpoint)
    val_loc = resolve(data.val, endpoint) if data.val else None
    if _kind_of(train_loc, "data.train") == "imagefolder":
        return _plan_imagefolder(train_loc, val_loc, data.val_fraction, seed)
    return _plan_parquet(data, train_loc, val_loc, seed)


def _split(kind: str, loc: Location, pairs: list[tuple[str, str]], index: dict[str, int]) -> Split:
    """A split of (file, class) pairs, labelled by the class index."""
    return Split(kind, loc, [f for f, _ in pairs], [index[c] for _, c in pairs], len(pairs))


def _plan_imagefolder(
    train_loc: Location, val_loc: Location | None, val_fraction: float, seed: int
) -> DataPlan:
    classes, by_class = scan_imagefolder(train_loc, "data.train")
    index = {c: i for i, c in enumerate(classes)}
    if val_loc is None:
        tr, va = stratified_split(by_class, val_fraction, seed)
        train = _split("imagefolder", train_loc, tr, index)
        val = _split("imagefolder", train_loc, va, index)
    else:
        if _kind_of(val_loc, "data.val") != "imagefolder":
            raise TlctlError("data.val: must be an ImageFolder directory like data.train")
        val_classes, val_by_class = scan_imagefolder(val_loc, "data.val")
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise TlctlError(
                f"data.val: classes not in data.train: {', '.join(unknown)} "
                f"(valid: {', '.join(classes)})"
            )
        train_pairs = [(f, c) for c in classes for f in by_class[c]]
        random.Random(seed).shuffle(train_pairs)  # class-mixed blocks
        train = _split("imagefolder", train_loc, train_pairs, index)
        val_pairs = [(f, c) for c in val_classes for f in val_by_class[c]]
        val = _split("imagefolder", val_loc, val_pairs, index)
    if val.rows == 0:
        raise TlctlError("data.val_fraction: leaves no validation images; raise it or set data.val")
    return DataPlan(classes, train, val, val_fraction, seed)


def _plan_parquet(
    data: DataSpec, train_loc: Location, val_loc: Location | None, seed: int
) -> DataPlan:
    image_column, label_column = data.image_column, data.label_column
    files = parquet_files(train_loc, "data.train")
    if not files:
        raise TlctlError(f"data.train: {train_loc.uri} holds no .parquet files")
    labels = parquet_labels(train_loc, files, image_column, label_column, "data.train")
    classes = label_names(labels)
    if len(classes) < 2:
        raise TlctlError(f"data.train: {train_loc.uri} has fewer than 2 distinct labels")
    train = Split("parquet", train_loc, files, rows=len(labels))
    val = None
    if val_loc is not None:
        vfiles = parquet_files(val_loc, "data.val")
        if not vfiles:
            raise TlctlError(f"data.val: {val_loc.uri} holds no .parquet files")
        vlabels = parquet_labels(val_loc, vfiles, image_column, label_column, "data.val")
        if not vlabels:
            raise TlctlError(f"data.val: {val_loc.uri} holds no rows (no validation images)")
        unknown = sorted(set(label_names(vlabels)) - set(classes))
        if unknown:
            raise TlctlError(f"data.val: labels not in data.train: {', '.join(unknown)}")
        val = Split("parquet", val_loc, vfiles, rows=len(vlabels))
    else:
        n_train, n_val = parquet_split_rows(len(labels), data.val_fraction)
        if n_val == 0 or n_train == 0:
            side, fix = ("validation", "raise it") if n_val == 0 else ("training", "lower it")
            raise TlctlError(
                f"data.val_fraction: {data.val_fraction} of the {len(labels)} rows of "
                f"{train_loc.uri} leaves no {side} rows; {fix} or set data.val"
            )
    return DataPlan(classes, train, val, data.val_fraction, seed, image_column, label_column)
