"""Checkpoint files (safetensors, whose format the ``safetensors`` package reads and writes; torch; JSON; JSON lines),
with errors naming the file, written atomically via a fsynced temp file and ``os.replace``; and the cache folder."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

import safetensors.torch
import torch

StrPath: TypeAlias = "str | os.PathLike[str]"


class CheckpointError(ValueError):
    """A checkpoint file (or what was asked to be saved in one) is invalid."""


def cache_dir() -> Path:
    """Where downloads and once-trained reference models are kept: $DIFFUSIONBLOCKS_CACHE, else
    ~/.cache/diffusionblocks."""
    return Path(os.environ.get("DIFFUSIONBLOCKS_CACHE") or "~/.cache/diffusionblocks").expanduser()


# -----------------------------------------------------------------------------
# atomic writes


@contextlib.contextmanager
def atomic_file(path: StrPath) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only once the ``with`` block completes without error."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    # 0o666 so that the umask, not mkstemp's 0o600, decides the final file's permissions
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX only; a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# several files replaced as one (a checkpoint: weights, averaged weights, optimizer state)

PENDING = ".pending"  # a file written beside its target, waiting to replace it
INTENT = ".commit.json"  # the names of the pending files being moved into place: the commit point


def write_together(directory: StrPath, writers: dict[str, Any]) -> None:
    """Replace the files ``directory/name`` for each ``name: write(f)`` in ``writers`` as one: each is written whole
    beside its target first, then an intent record lists them, then each is moved into place. A failure before the
    intent record (a full disk) leaves every old file as it was; a crash after it is completed by :func:`recover`."""
    directory = Path(directory)
    recover(directory)
    try:
        for name, write in writers.items():
            with atomic_file(directory / f".{name}{PENDING}") as f:
                write(f)
    except BaseException:
        for name in writers:
            (directory / f".{name}{PENDING}").unlink(missing_ok=True)
        raise
    atomic_write_text(directory / INTENT, json.dumps(sorted(writers)))
    recover(directory)


def recover(directory: StrPath) -> list[str]:
    """Finish an interrupted :func:`write_together` (every pending file of a recorded commit moved into place) and
    remove what a crash left half-written (pending files of an unrecorded one, temp files). Returns the names
    moved. Only a process that owns ``directory`` (the run lock) may call this."""
    directory, moved = Path(directory), []
    intent = directory / INTENT
    if intent.exists():
        try:
            names = json.loads(intent.read_text(encoding="utf-8"))
        except ValueError:  # written atomically, so whole or absent; anything else is not ours to trust
            raise CheckpointError(f"{intent}: not a commit record; remove it and the {PENDING} files") from None
        for name in names:
            pending = directory / f".{name}{PENDING}"
            if pending.exists():
                os.replace(pending, directory / name)
                moved.append(name)
        _fsync_dir(directory)
        intent.unlink()
    for leftover in [*directory.glob(f".*{PENDING}"), *directory.glob(".*.tmp")]:
        leftover.unlink(missing_ok=True)
    return moved


def atomic_write_bytes(path: StrPath, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: StrPath, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (no newline translation)."""
    atomic_write_bytes(path, text.encode(encoding))


def save_json(path: StrPath, obj: Any) -> None:
    """Write ``obj`` as indented JSON (keys in insertion order, trailing newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def load_json(path: StrPath) -> Any:
    """Read a JSON file, with a CheckpointError naming the file when it is missing or malformed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:  # a folder, no permission
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None


def json_line(record: dict[str, Any]) -> str:
    """One JSON-lines record, newline included."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def atomic_torch_save(obj: Any, path: StrPath) -> None:
    """``torch.save(obj)`` to ``path`` atomically. Keep ``obj`` to what :func:`load_torch` accepts."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def load_torch(path: StrPath, map_location: str | torch.device | None = "cpu") -> Any:
    """Load a file written by :func:`atomic_torch_save` with ``weights_only=True`` (safe for untrusted files).

    Containers of tensors, numbers, strings, bools, None, lists, tuples and dicts load, and so do optimizer
    ``state_dict()``s and ``torch.Generator.get_state()``; arbitrary pickled objects are refused.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False (arbitrary code execution): keep only what it found
        found = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line][:1]
        message = ": ".join([f"{path}: refused to load (not a plain weights-only checkpoint)", *found])
        raise CheckpointError(message) from e
    except Exception as e:  # a truncated or foreign file surfaces as RuntimeError, struct.error, EOFError, ...
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {e}") from e


# -----------------------------------------------------------------------------
# safetensors: the package reads, writes and validates the format; here are tied weights, metadata in a fixed
# order, atomic replacement and errors that name the file.

TIED_KEY = "diffusionblocks.tied"  # reserved metadata key: JSON {alias: source} of tied entries, saved once


def _tied_names(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """{alias: source} for entries that are the very same view of one storage as an earlier entry (tied weights).
    Other views of one storage (slices, reshapes) are refused: they would come back as untied copies."""
    views_by_storage: dict[tuple[torch.device, int], dict[tuple[Any, ...], str]] = {}
    ties: dict[str, str] = {}
    for name, t in tensors.items():
        storage = t.untyped_storage()
        if storage.nbytes() == 0:
            continue
        views = views_by_storage.setdefault((t.device, storage.data_ptr()), {})
        view = (t.dtype, tuple(t.shape), t.stride(), t.storage_offset())
        if view in views:
            ties[name] = views[view]
        else:
            views[view] = name
    for views in views_by_storage.values():
        if len(views) > 1:
            raise ValueError(f"tensors {', '.join(map(repr, views.values()))} are different views of one storage "
                             "(e.g. slices of one tensor); .clone() them before saving (only identical tied "
                             "tensors are saved once and re-tied on load)")
    return ties


def save_safetensors(tensors: dict[str, torch.Tensor], path: StrPath, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (and optional string ``metadata``) to ``path`` in the safetensors format, atomically.

    Tensors are copied to CPU and made contiguous; the safetensors package lays them out (by dtype, then name).
    Tied weights (entries that are the same tensor, e.g. an embedding and an LM head) are saved once, under the
    first name, and :func:`load_safetensors` re-ties them; other tensors sharing storage are refused.
    """
    atomic_write_bytes(path, safetensors_bytes(tensors, path, metadata))


def safetensors_bytes(tensors: dict[str, torch.Tensor], path: StrPath, metadata: dict[str, str] | None = None) -> bytes:
    """The bytes :func:`save_safetensors` writes to ``path`` (named in errors)."""
    try:
        if TIED_KEY in (metadata or {}):
            raise ValueError(f"metadata key {TIED_KEY!r} is reserved (it records tied weights)")
        if any(str(name).startswith("__") for name in tensors):  # the package would write a broken header
            raise ValueError("tensor names starting with '__' are reserved by safetensors")
        header_metadata = {**(metadata or {})}
        ties = _tied_names(tensors)
        if ties:
            header_metadata[TIED_KEY] = json.dumps(ties, ensure_ascii=False)
        unique = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items() if name not in ties}
        data = safetensors.torch.save(unique, metadata=header_metadata or None)
    except Exception as e:  # what the package or torch refuses: names, dtypes, layouts, metadata types
        raise CheckpointError(f"{path}: cannot save these tensors: {e}") from e
    return _sorted_metadata(data)


def _sorted_metadata(data: bytes) -> bytes:
    """The same file with its metadata keys in sorted order: the package writes them in hash order, so equal
    tensors and metadata would otherwise give different bytes from run to run. Data offsets are relative to the
    end of the header, so the header may be re-serialised freely (padded with spaces to 8 bytes, as the format asks)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def load_safetensors_metadata(path: StrPath) -> dict[str, str]:
    """The metadata of a safetensors file, read from its header alone."""
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
    return {k: v for k, v in metadata.items() if k != TIED_KEY}


def load_safetensors(
    path: StrPath, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file; return (tensors in the file's data order, metadata or {}).

    Every tensor owns writable memory; tied weights come back as one tensor object under each of their names.
    The safetensors package validates the file; whatever is wrong with it is raised as a CheckpointError naming it.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    try:
        loaded = safetensors.torch.load(data)
    except MemoryError:
        raise
    except Exception as e:  # SafetensorError, or KeyError for a dtype the torch binding lacks
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated, damaged or another format): "
                              f"{type(e).__name__}: {e}") from e
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # validated by the package
    del data
    metadata = header.pop("__metadata__", None) or {}
    device, tensors = torch.device(device), {}
    for name in sorted(header, key=lambda name: header[name]["data_offsets"][0]):  # empty tensors keep header order
        t = loaded.pop(name)
        if t.dtype == torch.bool and t.numel() and int(t.view(torch.uint8).max()) > 1:
            raise CheckpointError(f"{path}: BOOL tensor {name!r} holds bytes other than 0 and 1")
        owns_memory = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        tensors[name] = (t if owns_memory else t.clone()).to(device)
    try:
        ties = json.loads(metadata.pop(TIED_KEY, "{}"))
        if any(alias in tensors for alias in ties):
            raise ValueError("an alias is also a tensor in the file")
        tensors.update({alias: tensors[source] for alias, source in ties.items()})
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise CheckpointError(f"{path}: header invalid: metadata {TIED_KEY!r} does not tie names of the file "
                              f"({type(e).__name__}: {e})") from e
    return tensors, metadata


# -----------------------------------------------------------------------------
# JSON lines (metrics logs)


def _start_of_last_line(f: BinaryIO, end: int, chunk: int = 1 << 16) -> int:
    """The offset just after the last b"\\n" before ``end`` (0 if there is none)."""
    pos = end
    while pos > 0:
        start = max(0, pos - chunk)
        f.seek(start)
        i = f.read(pos - start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def append_jsonl(path: StrPath, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (created if missing) and flush it.

    If a previous writer was killed mid-line, that torn line is completed with a newline when it is
    valid JSON and cut off otherwise, so the new record always starts on its own line.
    """
    if not isinstance(record, dict):
        raise TypeError(f"append_jsonl({path}): record must be a dict, got {type(record).__name__}")
    line = json_line(record).encode("utf-8")
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end > 0:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                start = _start_of_last_line(f, end)
                f.seek(start)
                try:
                    json.loads(f.read(end - start).decode("utf-8"))
                    f.write(b"\n")
                except ValueError:
                    f.truncate(start)
        f.write(line)
        f.flush()


def read_jsonl(path: StrPath, skip_bad: bool = False) -> list[dict[str, Any]]:
    """Read the records of a JSON-lines file, ignoring blank lines and a truncated (unparsable) last line; with
    `skip_bad`, every line that is not a JSON object is left out with a warning instead of an error."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    lines = raw.split(b"\n")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            problem = None if isinstance(record, dict) else f"expected a JSON object, got {type(record).__name__}"
        except ValueError as e:
            if number == len(lines):  # no newline after it: the writer was killed mid-line
                break
            problem = f"not valid JSON ({e})"
        if problem and not skip_bad:
            raise CheckpointError(f"{path}:{number}: {problem}")
        if problem:
            warnings.warn(f"{path}:{number}: {problem}; line left out", stacklevel=2)
        else:
            records.append(record)
    return records
