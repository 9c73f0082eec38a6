"""Checkpoint files: safetensors through the package (round trips, tied weights, interop, errors naming the file),
atomic replacement, torch checkpoints, JSON lines."""

import json
import os
import struct
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

from diffusionblocks import io
from diffusionblocks.io import (
    CheckpointError,
    append_jsonl,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    load_safetensors,
    load_torch,
    read_jsonl,
    save_json,
    save_safetensors,
)

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random data of any dtype: random bytes reinterpreted (bool: 0/1 only)."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for d in shape:
        count *= d
    raw = torch.randint(0, 256, (count * itemsize,), generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {str(dtype): random_tensor(dtype, (3, 5), g) for dtype in DTYPES}
    out["scalar"] = torch.tensor(3.5)
    out["scalar_bf16"] = torch.tensor(-1.25, dtype=torch.bfloat16)
    out["empty"] = torch.zeros(0, 4)
    out["empty_i64"] = torch.zeros(2, 0, dtype=torch.int64)
    out["transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # non-contiguous view
    return out


def read_header(path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def file_order(path) -> list[str]:
    """Tensor names in the order of their data in the file."""
    header = read_header(path)[1]
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for name, t in expected.items():
        assert loaded[name].dtype == t.dtype, name
        assert loaded[name].shape == t.shape, name
        assert torch.equal(raw_bytes(loaded[name]), raw_bytes(t)), name  # bit-exact, NaN payloads included


def assert_owns_writable_memory(t: torch.Tensor) -> None:
    assert t.storage_offset() == 0
    assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    if t.numel():
        raw = raw_bytes(t)
        before = int(raw[0])
        raw[0] = before ^ 1
        assert int(raw_bytes(t)[0]) == before ^ 1
        raw[0] = before


# -----------------------------------------------------------------------------
# safetensors roundtrip and format


def test_roundtrip_every_dtype_with_metadata(tmp_path):
    tensors = all_dtype_tensors()
    metadata = {"step": "12", "config": json.dumps({"lr": 1e-3}), "note": "héllo"}
    path = tmp_path / "model.safetensors"
    save_safetensors(tensors, path, metadata=metadata)
    loaded, meta = load_safetensors(path)
    assert_same(loaded, tensors)
    assert meta == metadata
    assert not tensors["transposed"].is_contiguous()
    assert all(t.is_contiguous() for t in loaded.values())
    for t in loaded.values():
        assert_owns_writable_memory(t)


def test_no_metadata_loads_as_empty_dict_and_tensors_own_memory(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors({"w": torch.ones(2, 3), "b": torch.zeros(3)}, str(path))
    loaded, meta = load_safetensors(str(path), device=torch.device("cpu"))
    assert meta == {}
    assert "__metadata__" not in read_header(path)[1]
    # each tensor has its own storage (not a view into one shared buffer) and is writable
    assert loaded["w"].untyped_storage().data_ptr() != loaded["b"].untyped_storage().data_ptr()
    loaded["w"].add_(1)
    assert torch.equal(loaded["w"], torch.full((2, 3), 2.0))
    assert torch.equal(load_safetensors(path)[0]["w"], torch.ones(2, 3))  # the file is untouched


def test_tensors_come_back_in_file_order(tmp_path):
    tensors = {
        "z": torch.ones(3, dtype=torch.float16),
        "a": torch.ones(2),
        "m": torch.ones(1, dtype=torch.int8),
        "b": torch.ones(2, dtype=torch.float64),
        "c": torch.ones(4),
    }
    path = tmp_path / "o.safetensors"
    save_safetensors(tensors, path)
    order = file_order(path)
    assert sorted(order) == sorted(tensors)
    for _ in range(3):  # stable, not hash order
        assert list(load_safetensors(path)[0]) == order
    with st.safe_open(str(path), framework="pt") as f:
        if hasattr(f, "offset_keys"):
            assert list(f.offset_keys()) == order


def test_on_disk_format(tmp_path):
    tensors = {
        "x": torch.tensor([1.0, -2.5, 3.25], dtype=torch.float32),
        "h": torch.ones(2, 3, dtype=torch.bfloat16),
        "m": torch.tensor([[True], [False]]),
        "s": torch.tensor(7, dtype=torch.int64),
        "e": torch.zeros(0, 2, dtype=torch.float16),
    }
    path = tmp_path / "f.safetensors"
    save_safetensors(tensors, path, metadata={"a": "b"})
    raw = path.read_bytes()
    n, header = read_header(path)
    assert (8 + n) % 8 == 0  # the data starts 8-byte aligned
    assert header.pop("__metadata__") == {"a": "b"}
    assert sorted(header) == sorted(tensors)
    assert {k: v["dtype"] for k, v in header.items()} == {"x": "F32", "h": "BF16", "m": "BOOL", "s": "I64", "e": "F16"}
    assert {k: v["shape"] for k, v in header.items()} == {"x": [3], "h": [2, 3], "m": [2, 1], "s": [], "e": [0, 2]}
    # the tensors' byte ranges tile the data buffer exactly
    data = raw[8 + n :]
    ranges = sorted(tuple(v["data_offsets"]) for v in header.values())
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data) == 34
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))

    def data_of(name):
        begin, end = header[name]["data_offsets"]
        return data[begin:end]

    assert data_of("x") == struct.pack("<3f", 1.0, -2.5, 3.25)
    assert data_of("h") == b"\x80\x3f" * 6  # bf16 1.0 = 0x3F80, little-endian
    assert data_of("m") == b"\x01\x00"
    assert data_of("s") == struct.pack("<q", 7)
    assert data_of("e") == b""


def test_files_interoperate_with_the_package(tmp_path):
    tensors = all_dtype_tensors()
    ours = tmp_path / "ours.safetensors"
    save_safetensors(tensors, ours, metadata={"k": "v"})
    assert_same(st.load_file(str(ours)), tensors)
    with st.safe_open(str(ours), framework="pt") as f:
        assert f.metadata() == {"k": "v"}

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    theirs = tmp_path / "theirs.safetensors"
    st.save_file(contiguous, str(theirs), metadata={"x": "y"})
    loaded, meta = load_safetensors(theirs)
    assert meta == {"x": "y"}
    assert_same(loaded, contiguous)
    st.save_file({"w": torch.ones(2)}, str(theirs))  # no metadata at all
    assert load_safetensors(theirs)[1] == {}


# -----------------------------------------------------------------------------
# tied weights


def test_tied_weights_are_saved_once_and_come_back_tied(tmp_path):
    w = torch.randn(64, 32)
    tensors = {"embed.weight": w, "norm": torch.ones(32), "head.weight": w, "lm_head.weight": w[:]}
    path = tmp_path / "tied.safetensors"
    save_safetensors(tensors, path, metadata={"step": "3"})

    with st.safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["embed.weight", "norm"]  # one copy of w in the file
        ties = json.loads(f.metadata()[io.TIED_KEY])
    assert ties == {"head.weight": "embed.weight", "lm_head.weight": "embed.weight"}
    assert path.stat().st_size < w.numel() * 4 + 32 * 4 + 1024

    loaded, meta = load_safetensors(path)
    assert meta == {"step": "3"}  # the reserved key is not handed back
    assert sorted(loaded) == sorted(tensors)
    assert loaded["head.weight"] is loaded["embed.weight"]
    assert loaded["lm_head.weight"] is loaded["embed.weight"]
    assert loaded["norm"] is not loaded["embed.weight"]
    assert torch.equal(loaded["embed.weight"], w) and torch.equal(loaded["norm"], torch.ones(32))
    loaded["head.weight"].add_(1)
    assert torch.equal(loaded["embed.weight"], w + 1)


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied input and output embeddings

    def forward(self, tokens):
        return self.head(self.norm(self.embed(tokens)))


def test_tied_module_state_dict_round_trips(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    path = tmp_path / "lm.safetensors"
    save_safetensors(model.state_dict(), path)
    assert path.stat().st_size < 50 * 16 * 4 * 2  # the embedding is stored once, not twice

    torch.manual_seed(1)
    model2 = TinyLM()
    assert not torch.equal(model2.embed.weight, model.embed.weight)
    loaded, _ = load_safetensors(path)
    assert loaded["head.weight"] is loaded["embed.weight"]
    model2.load_state_dict(loaded)  # strict: every key of the state_dict is there
    assert model2.head.weight is model2.embed.weight
    assert torch.equal(model2.embed.weight, model.embed.weight)
    tokens = torch.tensor([[1, 5, 7, 49]])
    assert torch.equal(model2(tokens), model(tokens))
    with torch.no_grad():
        model2.embed.weight.mul_(2)
    assert torch.equal(model2.head.weight, 2 * model.embed.weight)


@pytest.mark.parametrize(
    "make",
    [
        lambda w: {"a": w[:3], "b": w[1:]},  # overlapping slices
        lambda w: {"a": w[:2], "b": w[2:]},  # disjoint slices of one buffer
        lambda w: {"a": w, "other": torch.ones(1), "b": w.t()},  # same data, other layout
        lambda w: {"a": w, "b": w.reshape(-1)},
        lambda w: {"a": w, "b": w.view(torch.int32)},
    ],
)
def test_different_views_of_one_storage_are_refused(tmp_path, make):
    w = torch.randn(4, 4)
    path = tmp_path / "views.safetensors"
    with pytest.raises(CheckpointError, match=r"'a', 'b' are different views of one storage.*\.clone\(\)") as info:
        save_safetensors(make(w), path)
    assert str(path) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_tie_metadata_key_is_reserved_and_checked_on_load(tmp_path):
    path = tmp_path / "r.safetensors"
    with pytest.raises(CheckpointError, match="'diffusionblocks.tied' is reserved"):
        save_safetensors({"a": torch.ones(1)}, path, metadata={io.TIED_KEY: "{}"})
    assert list(tmp_path.iterdir()) == []
    for bad in ("{not json", '["a"]', '{"b": "missing"}', '{"a": "a"}'):
        st.save_file({"a": torch.ones(1)}, str(path), metadata={io.TIED_KEY: bad})
        with pytest.raises(CheckpointError, match=f"{path.name}: header invalid.*{io.TIED_KEY}"):
            load_safetensors(path)


# -----------------------------------------------------------------------------
# safetensors errors


@pytest.mark.parametrize(
    ("tensors", "metadata"),
    [
        ([torch.ones(1)], None),
        ({1: torch.ones(1)}, None),
        ({"__metadata__": torch.ones(1)}, None),  # the package would write it, as a broken header
        ({"a": [1.0]}, None),
        ({"a": torch.ones(2, dtype=torch.complex128)}, None),
        ({"a": torch.ones(2, device="meta")}, None),
        ({"a": torch.ones(2).to_sparse()}, None),
        ({"a": torch.ones(1)}, {"step": 3}),
        ({"a": torch.ones(1)}, [("k", "v")]),
    ],
)
def test_bad_input_is_rejected(tmp_path, tensors, metadata):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(CheckpointError) as info:
        save_safetensors(tensors, path, metadata=metadata)
    assert str(info.value).startswith(f"{path}: ")
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        load_safetensors(path)


@pytest.mark.parametrize("keep", [0, 3, 20, -1])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "t.safetensors"
    save_safetensors({"a": torch.randn(10), "b": torch.randn(10)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[:keep])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_safetensors(path)
    assert str(path) in str(info.value)


def test_garbage_and_foreign_files(tmp_path):
    path = tmp_path / "g.safetensors"
    not_json = struct.pack("<Q", 16) + b"this is not json"
    for write in (lambda: path.write_bytes(not_json), lambda: path.write_bytes(b"PK\x03\x04 a zip file"),
                  lambda: atomic_torch_save({"w": torch.ones(3)}, path)):
        write()
        with pytest.raises(CheckpointError, match="g.safetensors: not a readable safetensors file"):
            load_safetensors(path)
        with pytest.raises(CheckpointError, match="g.safetensors: not a readable safetensors file"):
            io.load_safetensors_metadata(path)


def write_raw(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


UNREADABLE = "not a readable safetensors file"


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8 + b"extra", UNREADABLE),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
            UNREADABLE,
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, UNREADABLE),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, UNREADABLE),
        ({"a": {"dtype": "X99", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, f"{UNREADABLE}.*X99"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, UNREADABLE),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, f"{UNREADABLE}.*data_offsets"),
        ({"a": {"dtype": "BOOL", "shape": [1], "data_offsets": [0, 1]}}, b"\x07", "other than 0 and 1"),
        ({"__metadata__": {"k": 1}}, b"", UNREADABLE),
    ],
)
def test_invalid_files_are_rejected(tmp_path, header, data, message):
    path = tmp_path / "x.safetensors"
    write_raw(path, header, data)
    with pytest.raises(CheckpointError, match=message) as info:
        load_safetensors(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (KeyError("F8_E8M0"), "KeyError: 'F8_E8M0'"),
        (RuntimeError("something new"), "RuntimeError: something new"),
    ],
)
def test_any_error_of_the_package_becomes_a_checkpoint_error(tmp_path, monkeypatch, error, message):
    path = tmp_path / "p.safetensors"
    save_safetensors({"a": torch.ones(1)}, path)

    def fail(data):
        raise error

    monkeypatch.setattr(io.safetensors.torch, "load", fail)
    with pytest.raises(CheckpointError, match=f"p.safetensors: {UNREADABLE}.*{message}"):
        load_safetensors(path)


# -----------------------------------------------------------------------------
# atomic replacement


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_safetensors({"w": torch.zeros(3)}, path)
    before = path.read_bytes()
    written = []

    def fail_after_writing(fd):
        written.append(os.fstat(fd).st_size)
        raise OSError("disk on fire")

    monkeypatch.setattr(io.os, "fsync", fail_after_writing)
    with pytest.raises(OSError, match="disk on fire"):
        save_safetensors({"w": torch.ones(3), "v": torch.ones(3)}, path)
    assert len(written) == 1 and written[0] > len(before)  # the new file was being written to a temp file
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]
    monkeypatch.undo()
    save_safetensors({"w": torch.ones(3), "v": torch.ones(3)}, path)
    assert sorted(load_safetensors(path)[0]) == ["v", "w"]


@pytest.mark.parametrize(
    "write",
    [
        lambda p: save_safetensors({"w": torch.ones(3)}, p),
        lambda p: atomic_torch_save({"w": torch.ones(3)}, p),
        lambda p: atomic_write_bytes(p, b"new"),
        lambda p: save_json(p, {"new": 1}),
    ],
)
def test_failed_replace_leaves_old_file_and_no_temp(tmp_path, monkeypatch, write):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old contents")

    def refuse(src, dst):
        raise OSError("replace refused")

    monkeypatch.setattr(io.os, "replace", refuse)
    with pytest.raises(OSError, match="replace refused"):
        write(path)
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_writes_replace_and_text_helpers(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second\r\nline ü")
    assert path.read_bytes() == "second\r\nline ü".encode()
    save_json(path, {"b": 1, "a": [1, 2], "ü": "x"})
    assert path.read_text(encoding="utf-8") == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ],\n  "ü": "x"\n}\n'
    assert os.listdir(tmp_path) == ["a.txt"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_bytes(tmp_path / "missing_dir" / "f", b"")


# -----------------------------------------------------------------------------
# torch checkpoints


def test_torch_checkpoint_roundtrip_weights_only(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(torch.randn(5, 3)).square().mean().backward()
    opt.step()
    gen = torch.Generator().manual_seed(1234)
    torch.rand(7, generator=gen)
    ckpt = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": gen.get_state(),
        "step": 1,
        "loss": 0.25,
        "name": "run-a",
        "history": [1.0, 0.5],
        "flags": (True, None),
    }
    expected_draws = torch.rand(5, generator=gen)
    path = tmp_path / "state.pt"
    atomic_torch_save(ckpt, path)

    loaded = load_torch(path)  # weights_only=True inside
    assert loaded["step"] == 1 and loaded["loss"] == 0.25 and loaded["name"] == "run-a"
    assert loaded["history"] == [1.0, 0.5] and loaded["flags"] == (True, None)
    restored = torch.Generator()
    restored.set_state(loaded["rng"])
    assert torch.equal(torch.rand(5, generator=restored), expected_draws)

    model2 = torch.nn.Linear(3, 2)
    model2.load_state_dict(loaded["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    opt2.load_state_dict(loaded["optimizer"])
    assert opt2.param_groups[0]["lr"] == 1e-2
    state, state2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for key in state:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key][field], state2[key][field])
    # one more identical step keeps the two in lockstep
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(torch.ones(2, 3)).sum().backward()
        o.step()
    assert torch.equal(model.weight, model2.weight)


class Evil:
    pass


def test_load_torch_refuses_arbitrary_objects_and_missing_files(tmp_path):
    path = tmp_path / "evil.pt"
    atomic_torch_save({"obj": Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.pt: refused to load") as refused:
        load_torch(path)
    assert "GLOBAL" in str(refused.value) and "weights_only" not in str(refused.value)  # not torch's advice
    with pytest.raises(CheckpointError, match="no such file"):
        load_torch(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_torch(tmp_path / "junk.pt")


def test_cache_dir_is_the_environment_variable_else_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSIONBLOCKS_CACHE", str(tmp_path))
    assert io.cache_dir() == tmp_path
    monkeypatch.delenv("DIFFUSIONBLOCKS_CACHE")
    assert io.cache_dir() == Path.home() / ".cache" / "diffusionblocks"


# -----------------------------------------------------------------------------
# JSON lines


def test_jsonl_append_and_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1, "loss": 0.5})
    append_jsonl(path, {"step": 2, "loss": 0.25, "note": "ü"})
    assert path.read_text(encoding="utf-8").count("\n") == 2
    assert read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "note": "ü"}]
    with pytest.raises(CheckpointError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_read_jsonl_ignores_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_bytes('{"step": 1}\n{"note": "\u00fc"}'.encode()[:-3])  # cut inside a multi-byte character
    assert read_jsonl(path) == [{"step": 1}]
    path.write_bytes(b'{"step": 1}\n{"step": 2}')  # complete record, only the newline missing: kept
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_bytes(b'{"step": 1}\n{"step": \n{"step": 3}\n')  # corruption in the middle is an error
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_append_after_torn_line_starts_a_new_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "lo')  # killed mid-write: the torn record is dropped
    append_jsonl(path, {"step": 3})
    assert path.read_bytes() == b'{"step": 1}\n{"step": 3}\n'
    path.write_bytes(b'{"step": 1}\n{"step": 2}')  # killed just before the newline: the record is kept
    append_jsonl(path, {"step": 3})
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 3}]
