"""Checkpoint files: the safetensors format byte for byte, validation errors, atomic replacement, JSON lines."""

import json
import os
import struct

import pytest
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


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        out[str(dtype)] = torch.randn(3, 5, generator=g).to(dtype)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8):
        out[str(dtype)] = torch.randint(-100, 100, (2, 3, 2), generator=g).to(dtype)
    out["uint8"] = torch.randint(0, 256, (7,), generator=g).to(torch.uint8)
    out["bool"] = torch.rand(4, 2, generator=g) > 0.5
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


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(expected)
    for name, t in expected.items():
        assert loaded[name].dtype == t.dtype, name
        assert loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name


# -----------------------------------------------------------------------------
# safetensors roundtrip and format


def test_roundtrip_every_dtype_with_metadata(tmp_path):
    tensors = all_dtype_tensors()
    assert {t.dtype for t in tensors.values()} == set(io.SAFETENSORS_DTYPES)
    metadata = {"step": "12", "config": json.dumps({"lr": 1e-3}), "note": "héllo"}
    path = tmp_path / "model.safetensors"
    save_safetensors(tensors, path, metadata=metadata)
    loaded, meta = load_safetensors(path)
    assert_same(loaded, tensors)
    assert meta == metadata
    assert not tensors["transposed"].is_contiguous()
    assert all(t.is_contiguous() for t in loaded.values())


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
    assert (8 + n) % 8 == 0
    assert set(raw[8 : 8 + n].decode("utf-8").split("}")[-1]) <= {" "}  # only padding after the JSON
    assert header.pop("__metadata__") == {"a": "b"}
    assert list(header) == list(tensors)
    assert {k: v["dtype"] for k, v in header.items()} == {"x": "F32", "h": "BF16", "m": "BOOL", "s": "I64", "e": "F16"}
    assert {k: v["shape"] for k, v in header.items()} == {"x": [3], "h": [2, 3], "m": [2, 1], "s": [], "e": [0, 2]}
    # laid out back to back in header order, covering the whole buffer
    offsets = [v["data_offsets"] for v in header.values()]
    assert offsets == [[0, 12], [12, 24], [24, 26], [26, 34], [34, 34]]
    data = raw[8 + n :]
    assert len(data) == 34
    assert data[0:12] == struct.pack("<3f", 1.0, -2.5, 3.25)
    assert data[12:24] == b"\x80\x3f" * 6  # bf16 1.0 = 0x3F80, little-endian
    assert data[24:26] == b"\x01\x00"
    assert data[26:34] == struct.pack("<q", 7)


def test_header_is_space_padded_to_multiple_of_8(tmp_path):
    for name_len in range(1, 10):  # header lengths with every remainder mod 8
        path = tmp_path / f"p{name_len}.safetensors"
        save_safetensors({"n" * name_len: torch.zeros(1)}, path)
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert n % 8 == 0
        text = raw[8 : 8 + n].decode("utf-8")
        assert text.rstrip(" ").endswith("}")
        assert len(text) - len(text.rstrip(" ")) < 8
        assert load_safetensors(path)[0]["n" * name_len].item() == 0


def test_cross_check_with_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = all_dtype_tensors()
    ours = tmp_path / "ours.safetensors"
    save_safetensors(tensors, ours, metadata={"k": "v"})
    theirs_loaded = st.load_file(str(ours))
    assert_same({k: theirs_loaded[k] for k in tensors}, tensors)
    with st.safe_open(str(ours), framework="pt") as f:
        assert f.metadata() == {"k": "v"}

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    theirs = tmp_path / "theirs.safetensors"
    st.save_file(contiguous, str(theirs), metadata={"x": "y"})
    loaded, meta = load_safetensors(theirs)
    assert meta == {"x": "y"}
    assert_same({k: loaded[k] for k in contiguous}, contiguous)


# -----------------------------------------------------------------------------
# safetensors errors


def test_shared_storage_is_rejected_naming_the_tensors(tmp_path):
    w = torch.randn(4, 4)
    path = tmp_path / "tied.safetensors"
    with pytest.raises(CheckpointError, match=r"'embed\.weight', 'head\.weight' share storage.*save only one"):
        save_safetensors({"embed.weight": w, "other": torch.ones(1), "head.weight": w}, path)
    with pytest.raises(CheckpointError, match="share storage"):
        save_safetensors({"a": w[:2], "b": w[2:]}, path)  # views of one tensor
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("tensors", "metadata", "message"),
    [
        ({1: torch.ones(1)}, None, "names must be str"),
        ({"__x": torch.ones(1)}, None, "starts with '__'"),
        ({"a": [1.0]}, None, "not a torch.Tensor"),
        ({"a": torch.ones(2, dtype=torch.complex64)}, None, "unsupported dtype torch.complex64"),
        ({"a": torch.ones(1)}, {"step": 3}, "metadata must map str -> str"),
    ],
)
def test_bad_input_is_rejected(tmp_path, tensors, metadata, message):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(CheckpointError, match=message) as info:
        save_safetensors(tensors, path, metadata=metadata)
    assert str(path) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        load_safetensors(path)


@pytest.mark.parametrize("keep", [3, 20, -1])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "t.safetensors"
    save_safetensors({"a": torch.randn(10), "b": torch.randn(10)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[:keep])
    message = "too short for a safetensors header" if 0 <= keep < 8 else "shorter than its header claims"
    with pytest.raises(CheckpointError, match=message) as info:
        load_safetensors(path)
    assert str(path) in str(info.value)


def test_garbage_header(tmp_path):
    path = tmp_path / "g.safetensors"
    body = b"this is not json"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        load_safetensors(path)
    path.write_bytes(b"PK\x03\x04 a zip file, e.g. from torch.save")
    with pytest.raises(CheckpointError, match="shorter than its header claims"):
        load_safetensors(path)


def write_raw(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8 + b"extra", "5 trailing bytes"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
        ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype 'C64'"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "needs 'dtype', 'shape' and 'data_offsets'"),
        ({"a": {"dtype": "BOOL", "shape": [1], "data_offsets": [0, 1]}}, b"\x07", "other than 0 and 1"),
        ({"__metadata__": {"k": 1}}, b"", "'__metadata__' must map str -> str"),
    ],
)
def test_invalid_files_are_rejected(tmp_path, header, data, message):
    path = tmp_path / "x.safetensors"
    write_raw(path, header, data)
    with pytest.raises(CheckpointError, match=message):
        load_safetensors(path)


# -----------------------------------------------------------------------------
# atomic replacement


def test_failed_serialisation_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_safetensors({"w": torch.zeros(3)}, path)
    before = path.read_bytes()
    real_write = io._write_tensor
    calls = []

    def write_then_fail(f, t):
        calls.append(1)
        if len(calls) == 2:  # after the header and the first tensor are in the temp file
            raise RuntimeError("disk on fire")
        real_write(f, t)

    monkeypatch.setattr(io, "_write_tensor", write_then_fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_safetensors({"w": torch.ones(3), "v": torch.ones(3)}, path)
    assert len(calls) == 2
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


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
    with pytest.raises(CheckpointError, match="evil.pt: refused to load"):
        load_torch(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_torch(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_torch(tmp_path / "junk.pt")


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
