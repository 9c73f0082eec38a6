"""Data as untrusted input: CIFAR pickles that would run code are refused, a run finds its data from any folder
and notices when it changed, and unreadable files, corrupted token caches, text that normalizes to nothing and
prompts with unseen characters are one clear error (or a rebuilt cache), never a traceback."""

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from diffusionblocks.config import apply_overrides, load_preset
from diffusionblocks.data import DataError, load_dataset
from diffusionblocks.run import load_model
from diffusionblocks.tasks import get_task
from diffusionblocks.tasks.lm import TOKENIZER_FILE, TextData
from diffusionblocks.text import (
    BPETokenizer,
    CharTokenizer,
    Text8Tokenizer,
    TextDataError,
    load_corpus,
    prepare_tokens,
)
from diffusionblocks.train import train

WORDS = ["the", "king", "and", "queen", "of", "a", "fair", "land", "spoke", "to", "their", "people", "grace"]


def _text(n_lines: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "".join(" ".join(rng.choice(WORDS, 8)) + ".\n" for _ in range(n_lines))


class _Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the official CIFAR batches: strings as STRING opcodes (bytes when
    unpickled with encoding="bytes")."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        b = obj if isinstance(obj, bytes) else obj.encode("ascii")
        self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b if len(b) < 256
                   else pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_py2_str


def _official_batch(rng, n: int) -> bytes:
    batch = {b"batch_label": b"training batch", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, n).tolist(), b"filenames": [b"img%d.png" % i for i in range(n)]}
    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(batch)
    return f.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")  # numpy 1's name


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_cifar_pickle_that_would_run_code_is_refused_and_the_official_format_loads(tmp_path):
    folder = tmp_path / "cache" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(_official_batch(rng, 2))
    ds = load_dataset("cifar10", cache_dir=tmp_path / "cache", download=False)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    marker = tmp_path / "payload-ran"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _RunsCode(marker), b"labels": [0]}))
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", cache_dir=tmp_path / "cache", download=False)
    assert not marker.exists()
    msg = str(info.value)
    assert str(folder / "data_batch_3") in msg and "mkdir" in msg and "\n" not in msg


def _tiny_npz(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (32, 8, 8), dtype=np.uint8), y_train=np.arange(32) % 4,
             x_test=rng.integers(0, 256, (8, 8, 8), dtype=np.uint8), y_test=np.arange(8) % 4)


def test_npz_run_evaluates_from_any_folder_and_notices_changed_data(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(work)
    _tiny_npz(work / "images.npz", 0)
    cfg = apply_overrides(load_preset("tiny"), ["data.name=images.npz", "train.method=e2e", "train.steps=2",
                                                "train.batch_size=8", "train.eval_limit=8"])
    train(cfg, "run", progress=False)
    monkeypatch.chdir(elsewhere)
    _, _, data = load_model(work / "run")
    assert len(data.y_test) == 8
    _tiny_npz(work / "images.npz", 1)  # the same shapes, other images
    with pytest.raises(ValueError, match=r"changed since it trained \(changed: images.npz\)"):
        load_model(work / "run")


def test_text_run_evaluates_from_any_folder_and_notices_changed_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSIONBLOCKS_CACHE", str(tmp_path / "cache"))
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(work)
    (work / "corpus.txt").write_text(_text(300))
    cfg = apply_overrides(load_preset("lm-tiny"), ["data.name=corpus.txt", "train.steps=2"])
    train(cfg, "run", progress=False)
    monkeypatch.chdir(elsewhere)
    load_model(work / "run")
    with open(work / "corpus.txt", "a") as f:
        f.write(_text(50, seed=1))
    with pytest.raises(ValueError, match=r"changed since it trained \(changed: corpus.txt\).*delete .*data.json"):
        load_model(work / "run")
    (work / "run" / "data.json").unlink()  # as a run saved before fingerprints: not checked
    load_model(work / "run")


def test_unreadable_corpus_is_one_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text(_text(10))
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: refuse it as the kernel would refuse anyone else
        read_bytes = Path.read_bytes

        def refused(self):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", refused)
    with pytest.raises(TextDataError, match=f"{path}: cannot read it \\(Permission denied\\)"):
        load_corpus(str(path))


def test_a_folder_where_a_tokenizer_json_belongs_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").mkdir()
    with pytest.raises(TextDataError, match="a folder, not a tokenizer file"):
        BPETokenizer.from_file(tmp_path / "tokenizer.json")
    data = TextData("toy", Text8Tokenizer(), {}, {}, 32)
    with pytest.raises(ValueError, match=f"{tmp_path / TOKENIZER_FILE}: cannot read it"):
        get_task("mdlm").check_run(data, tmp_path)  # the run directory's own tokenizer.json


def test_corrupted_token_cache_is_rebuilt(tmp_path):
    (tmp_path / "c.txt").write_text(_text(100))
    corpus, tokenizer = load_corpus(str(tmp_path / "c.txt")), Text8Tokenizer()
    cache = tmp_path / "cache"
    expected = np.array(prepare_tokens(corpus, tokenizer, "train", cache))
    (path,) = cache.glob("*-train-*.bin")
    for corrupt in (bytes([255]) * path.stat().st_size, path.read_bytes()[:-7]):  # garbage of the right size; cut
        path.write_bytes(corrupt)
        assert np.array_equal(prepare_tokens(corpus, tokenizer, "train", cache), expected)


def test_text_that_normalizes_to_nothing_names_the_file_and_the_tokenizer(tmp_path):
    (tmp_path / "digits.txt").write_text("12345 678, 90!\n" * 200)
    corpus = load_corpus(str(tmp_path / "digits.txt"))
    with pytest.raises(TextDataError, match=r"'digits' \(digits.txt\) has no characters left after the text8 "
                                            r"tokenizer's normalization \(data.tokenizer=text8\)"):
        prepare_tokens(corpus, Text8Tokenizer(), "train", tmp_path / "cache")


def test_prompt_with_characters_the_tokenizer_never_saw_is_refused(tmp_path):
    data = TextData("toy", CharTokenizer("abc \n"), {}, {}, 32)
    with pytest.raises(ValueError, match=r"never saw in training: 'zQ'"):
        get_task("mdlm").write_samples(None, data, load_preset("lm-tiny"), tmp_path / "s.txt", num=1, length=16,
                                       prompt="abzcQ z")
