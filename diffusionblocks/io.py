"""Checkpoint files (safetensors, implemented here without the package; torch; JSON; JSON lines), validated on
read and written atomically via a fsynced temp file and ``os.replace``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import struct
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

import torch

StrPath: TypeAlias = "str | os.PathLike[str]"

# safetensors dtype names of the dtypes we read and write
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
_METADATA_KEY = "__metadata__"
_MAX_HEADER_BYTES = 100_000_000  # the limit of the reference implementation


class CheckpointError(ValueError):
    """A checkpoint file (or what was asked to be saved in one) is invalid."""


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
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load (not a plain weights-only checkpoint): {e}") from e
    except OSError:
        raise
    except Exception as e:  # a truncated or foreign file surfaces as RuntimeError, struct.error, EOFError, ...
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {e}") from e


# -----------------------------------------------------------------------------
# safetensors


def _little_endian_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous CPU tensor as a flat uint8 tensor, in little-endian order."""
    raw = t.reshape(-1).view(torch.uint8)
    if sys.byteorder != "little" and t.element_size() > 1:
        raw = raw.view(-1, t.element_size()).flip(1).reshape(-1)
    return raw


def _check_tensors(tensors: dict[str, torch.Tensor], path: StrPath) -> None:
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: expected a dict of name -> tensor, got {type(tensors).__name__}")
    shared: dict[tuple[torch.device, int], list[str]] = {}
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: tensor names must be str, got {name!r} ({type(name).__name__})")
        if name.startswith("__"):
            raise CheckpointError(f"{path}: tensor name {name!r} starts with '__', which safetensors reserves")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided or t.is_meta:
            raise CheckpointError(f"{path}: {name!r} is a {t.layout} tensor on {t.device}; only dense data is saved")
        if t.dtype not in SAFETENSORS_DTYPES:
            supported = ", ".join(str(d).removeprefix("torch.") for d in SAFETENSORS_DTYPES)
            raise CheckpointError(f"{path}: {name!r} has unsupported dtype {t.dtype} (supported: {supported})")
        storage = t.untyped_storage()
        if storage.nbytes() > 0:
            shared.setdefault((t.device, storage.data_ptr()), []).append(name)
    for names in shared.values():
        if len(names) > 1:
            listed = ", ".join(repr(n) for n in names)
            raise CheckpointError(
                f"{path}: tensors {listed} share storage (tied weights or views of one tensor); save only one "
                "of them and re-tie after loading, or .clone() the others"
            )


def _check_metadata(metadata: dict[str, str], path: StrPath) -> None:
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: metadata must be a dict of str -> str, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise CheckpointError(
                f"{path}: metadata must map str -> str, got {key!r}: {value!r} ({type(value).__name__})"
            )


def save_safetensors(tensors: dict[str, torch.Tensor], path: StrPath, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (and optional string ``metadata``) to ``path`` in the safetensors format, atomically.

    Tensors are copied to CPU and written contiguously, in the dict's order. Entries that share storage
    (tied weights) are refused: safetensors can't express sharing, and loading would silently untie them.
    """
    _check_tensors(tensors, path)
    header: dict[str, Any] = {}
    if metadata is not None:
        _check_metadata(metadata, path)
        header[_METADATA_KEY] = dict(metadata)
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw_header = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw_header += b" " * (-len(raw_header) % 8)  # pad so that the data starts 8-byte aligned
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(raw_header)))
        f.write(raw_header)
        for t in tensors.values():
            _write_tensor(f, t)


def _write_tensor(f: BinaryIO, t: torch.Tensor) -> None:
    cpu = t.detach().to("cpu").contiguous()
    f.write(_little_endian_bytes(cpu).numpy())


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _read_header(f: BinaryIO, path: StrPath, file_size: int) -> tuple[dict[str, Any], int]:
    """Parse the header; return it and the file offset where the data buffer starts."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise CheckpointError(f"{path}: file is {file_size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix)
    if n > file_size - 8 or n > _MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: file is shorter than its header claims ({n} header bytes, {file_size - 8} after the "
            "length prefix); truncated, or not a safetensors file"
        )
    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); not a safetensors file?") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    return header, 8 + n


def _parse_entry(name: str, entry: Any, path: StrPath) -> tuple[torch.dtype, list[int], int, int]:
    """Validate one header entry; return (dtype, shape, begin, end)."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{path}: header entry {name!r} needs 'dtype', 'shape' and 'data_offsets': {entry!r}")
    dtype = _TORCH_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']!r} (supported: {', '.join(_TORCH_DTYPES)})"
        )
    shape, offsets = entry["shape"], entry["data_offsets"]

    def is_count(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} of dtype {entry['dtype']} and shape {shape} needs {expected} bytes, "
            f"but its data_offsets [{begin}, {end}] span {end - begin}"
        )
    return dtype, shape, begin, end


def load_safetensors(
    path: StrPath, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file; return (tensors in header order, metadata or {}).

    Every tensor owns its memory. The file is validated as strictly as the reference implementation does:
    the tensors' byte ranges must tile the data buffer exactly.
    """
    try:
        with open(path, "rb") as f:
            return _read_safetensors(f, path, torch.device(device))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None


def _read_safetensors(
    f: BinaryIO, path: StrPath, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    file_size = os.fstat(f.fileno()).st_size
    header, data_start = _read_header(f, path, file_size)
    data_size = file_size - data_start
    metadata = header.pop(_METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: '__metadata__' must map str -> str, got {metadata!r}")
    entries = {name: _parse_entry(name, entry, path) for name, entry in header.items()}

    cursor = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if end > data_size:
            raise CheckpointError(
                f"{path}: file is shorter than its header claims: tensor {name!r} ends at data byte {end}, "
                f"but the file holds only {data_size} data bytes (truncated?)"
            )
        if begin != cursor:
            problem = "overlaps the previous tensor" if begin < cursor else f"leaves a gap after byte {cursor}"
            raise CheckpointError(f"{path}: tensor {name!r} at data_offsets [{begin}, {end}] {problem}")
        cursor = end
    if cursor != data_size:
        raise CheckpointError(f"{path}: {data_size - cursor} trailing bytes after the last tensor")

    tensors: dict[str, torch.Tensor] = {}
    for name, (dtype, shape, begin, end) in entries.items():
        raw = torch.empty(end - begin, dtype=torch.uint8)
        f.seek(data_start + begin)
        if f.readinto(raw.numpy()) != end - begin:
            raise CheckpointError(f"{path}: file ended while reading tensor {name!r} (truncated?)")
        if dtype == torch.bool and raw.numel() and int(raw.max()) > 1:
            raise CheckpointError(f"{path}: BOOL tensor {name!r} holds bytes other than 0 and 1")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if sys.byteorder != "little" and itemsize > 1:
            raw = raw.view(-1, itemsize).flip(1).reshape(-1)
        tensors[name] = raw.view(dtype).reshape(shape).to(device)
    return tensors, dict(metadata)


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


def read_jsonl(path: StrPath) -> list[dict[str, Any]]:
    """Read the records of a JSON-lines file, ignoring blank lines and a truncated (unparsable) last line."""
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
        except ValueError as e:
            if number == len(lines):  # no newline after it: the writer was killed mid-line
                break
            raise CheckpointError(f"{path}:{number}: not valid JSON ({e})") from e
        if not isinstance(record, dict):
            raise CheckpointError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records
