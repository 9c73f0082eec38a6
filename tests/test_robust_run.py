"""Run directories under crashes, full disks, races and damaged files: a checkpoint is whole or absent, a run never
removes another's work, and a damaged file is one clear error (tiny preset, scikit-learn digits)."""

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import signal_on_step

from diffusionblocks import io
from diffusionblocks.cli import main
from diffusionblocks.config import apply_overrides
from diffusionblocks.jobs import merge
from diffusionblocks.methods.e2e import EndToEnd
from diffusionblocks.run import RunLock, load_model
from diffusionblocks.tasks.classify import preset_tiny
from diffusionblocks.tasks.images import ImageTask
from diffusionblocks.train import train

pytest.importorskip("sklearn", reason="the tiny preset trains on scikit-learn's digits")


def tiny(method="e2e", *overrides):
    cfg = preset_tiny()
    cfg.train.method = method
    return apply_overrides(cfg, ["train.eval_limit=60", *overrides])


def weights_step(run):
    return int(io.load_safetensors_metadata(run / "model.safetensors")["step"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "e2e"
    train(tiny("e2e", "train.steps=6"), run, progress=False)
    return run


def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    """A full disk while state.pt is written: the weights of the new checkpoint are not moved into place alone, so
    the previous checkpoint (weights and state of one step) survives and resumes."""
    run = tmp_path / "run"
    original = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        train(tiny("e2e", "train.steps=12", "train.ckpt_every=4"), run, progress=False)
    monkeypatch.setattr(torch, "save", original)
    assert weights_step(run) == io.load_torch(run / "state.pt")["step"] == 4
    assert not [p.name for p in run.iterdir() if p.name.endswith((".tmp", ".pending"))]
    assert train(None, run, resume=True, progress=False)["steps"] == 12


def test_a_crash_inside_the_commit_is_completed_on_resume(tmp_path, monkeypatch):
    """Killed after the commit record, with one file moved into place and the others pending: the resume moves the
    rest, and the run continues from that whole checkpoint."""
    run = tmp_path / "run"
    replace, moved = os.replace, []

    def crash(src, dst):
        if str(src).endswith(".pending"):
            moved.append(dst)
            if len(moved) == 4:  # step 8's weights are in place, its state.pt is not
                raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(io.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny("e2e", "train.steps=12", "train.ckpt_every=4"), run, progress=False)
    monkeypatch.setattr(io.os, "replace", replace)
    assert weights_step(run) != io.load_torch(run / "state.pt")["step"] and (run / io.INTENT).exists()
    results = train(None, run, resume=True, progress=False)
    assert results["steps"] == 12 and not (run / io.INTENT).exists()


def test_a_torn_checkpoint_is_refused(tmp_path):
    """Weights of one step beside state.pt of another (a checkpoint torn by an older version): no silent resume."""
    run = tmp_path / "run"
    train(tiny("e2e", "train.steps=6"), run, progress=False)
    state = io.load_torch(run / "state.pt")
    state["step"] = 3
    io.atomic_torch_save(state, run / "state.pt")
    with pytest.raises(ValueError, match="different checkpoints"):
        train(None, run, resume=True, progress=False)


@pytest.mark.parametrize("step", [10**9, -5, 2.5])
def test_state_counters_outside_the_run_are_refused(tmp_path, step):
    run = tmp_path / "run"
    train(tiny("e2e", "train.steps=6"), run, progress=False)
    state = io.load_torch(run / "state.pt")
    state["step"] = step
    io.atomic_torch_save(state, run / "state.pt")
    with pytest.raises(ValueError, match="outside this run's 0..6 steps"):
        train(None, run, resume=True, progress=False)


@pytest.mark.parametrize("saved", [[1, 2], {"step": 3}])
def test_a_state_file_of_another_shape_is_refused(tmp_path, saved):
    run = tmp_path / "run"
    train(tiny("e2e", "train.steps=6"), run, progress=False)
    io.atomic_torch_save(saved, run / "state.pt")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2


def test_resume_logs_the_window_it_was_stopped_in(tmp_path, monkeypatch):
    """The first metrics record after a resume averages the whole window, as an uninterrupted run's does."""
    cfg = tiny("e2e", "train.steps=20", "train.log_every=10", "train.ckpt_every=1000")
    train(cfg, tmp_path / "full", progress=False)
    original = signal_on_step(monkeypatch, EndToEnd, 7, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(EndToEnd, "step", original)
    train(None, tmp_path / "cut", resume=True, progress=False)
    losses = [[r["loss"] for r in io.read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]
              for name in ("full", "cut")]
    assert losses[0] == losses[1]


def test_a_damaged_metrics_line_does_not_block_resume(tmp_path, monkeypatch):
    run = tmp_path / "run"
    original = signal_on_step(monkeypatch, EndToEnd, 5, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(tiny("e2e", "train.steps=10", "train.log_every=2"), run, progress=False)
    monkeypatch.setattr(EndToEnd, "step", original)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{garbled", *lines[1:]]) + "\n")
    with pytest.warns(UserWarning, match="line left out"):
        assert train(None, run, resume=True, progress=False)["steps"] == 10


def test_crash_leftovers_are_cleaned_when_a_run_resumes(tmp_path, monkeypatch):
    run = tmp_path / "run"
    original = signal_on_step(monkeypatch, EndToEnd, 3, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(tiny("e2e", "train.steps=6"), run, progress=False)
    monkeypatch.setattr(EndToEnd, "step", original)
    (run / ".state.pt.0123456789ab.tmp").write_bytes(b"half")
    (run / ".model.safetensors.pending").write_bytes(b"half")
    (run / ".offload-abc").mkdir()
    (run / ".offload-abc" / "block0.bin").write_bytes(b"x" * 100)
    train(None, run, resume=True, progress=False)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_no_run_starts_in_a_folder_whose_run_is_reading_its_data(tmp_path, monkeypatch):
    """The lock is held from before the data is read: a second run into the same folder meanwhile is refused, so the
    first can never remove the second's files."""
    out, refused = tmp_path / "race", []
    load = ImageTask.load_data

    def slow_load(self, cfg):
        if not refused:
            with pytest.raises(ValueError, match="is in use") as e:
                train(tiny("e2e", "train.steps=2"), out, progress=False)
            refused.append(e)
        return load(self, cfg)

    monkeypatch.setattr(ImageTask, "load_data", slow_load)
    assert train(tiny("e2e", "train.steps=2"), out, progress=False)["steps"] == 2 and refused


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b'{"host": "elsewhere", "pid": 1}')
print("held", flush=True)
time.sleep(float(sys.argv[2]))
open(sys.argv[1] + ".released", "w").close()
"""


@pytest.mark.skipif(sys.platform == "win32", reason="advisory locks are POSIX")
def test_a_held_lock_refuses_and_a_waiting_lock_waits(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / ".lock"), "1.5"], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match="is in use.*elsewhere"), RunLock(tmp_path):
        pass
    with RunLock(tmp_path, wait=True):  # returns once the holder has let go
        assert (tmp_path / ".lock.released").exists()
    assert holder.wait(timeout=10) == 0


@pytest.mark.parametrize("content", ["", "garbled{", "[1, 2]", '{"host": "x", "pid": "y"}'])
def test_a_lock_file_nobody_holds_is_taken_whatever_it_says(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(content)
    assert train(tiny("e2e", "train.steps=2"), run, progress=False)["steps"] == 2
    assert not (run / ".lock").exists()


def _take_in_turn(folder):
    with RunLock(folder, wait=True):
        with open(folder / "log", "a") as f:
            f.write("in\n")
        time.sleep(0.2)
        with open(folder / "log", "a") as f:
            f.write("out\n")


@pytest.mark.skipif(sys.platform == "win32", reason="advisory locks are POSIX")
def test_racing_processes_never_share_the_lock(tmp_path):
    """Four processes start at once on a lock left by a process that is gone: one holds it at a time."""
    (tmp_path / ".lock").write_text(json.dumps({"host": "here", "pid": 999999}))
    procs = [multiprocessing.get_context("fork").Process(target=_take_in_turn, args=(tmp_path,)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert (tmp_path / "log").read_text().split() == ["in", "out"] * 4


@pytest.mark.parametrize("where", ["under-a-file", "broken-link"])
def test_an_unusable_out_fails_before_the_data_is_read(tmp_path, monkeypatch, capsys, where):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    out = tmp_path / ("file/run" if where == "under-a-file" else "link")
    monkeypatch.setattr(ImageTask, "load_data", lambda *a: pytest.fail("read the data first"))
    assert main(["train", "--preset", "tiny", "--out", str(out), "--no-progress", "train.steps=2"]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["int64", "nan"])
def test_weights_of_another_kind_or_not_finite_are_refused(tmp_path, finished, damage):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "model.safetensors"):
        (run / name).write_bytes((finished / name).read_bytes())
    weights, meta = io.load_safetensors(run / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name].long() if damage == "int64" else weights[name].fill_(float("nan"))
    io.save_safetensors(weights, run / "model.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="int64 where the model has" if damage == "int64" else "NaN"):
        load_model(run)


def test_a_run_writes_the_same_bytes_twice(tmp_path, finished):
    train(tiny("e2e", "train.steps=6"), tmp_path / "again", progress=False)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (finished / "model.safetensors").read_bytes()


def test_weights_files_are_byte_reproducible(tmp_path):
    tensors = {"b": torch.arange(3.0), "a": torch.ones(2)}
    metadata = {f"key{i}": str(i) for i in range(8)}
    for i in range(5):
        io.save_safetensors(tensors, tmp_path / f"{i}.safetensors", metadata=metadata)
    assert len({(tmp_path / f"{i}.safetensors").read_bytes() for i in range(5)}) == 1
    loaded, meta = io.load_safetensors(tmp_path / "0.safetensors")
    assert meta == metadata and torch.equal(loaded["b"], tensors["b"])


def test_merge_refuses_a_job_holding_another_blocks_weights(tmp_path):
    jobs = []
    for b in (0, 1):
        jobs.append(tmp_path / f"job{b}")
        train(tiny("dblocks", "train.steps=4", f"train.blocks={b}", "blocks.shared_stem_head=false",
              "dblocks.block_choice=round-robin"), jobs[-1],
              progress=False)
    (jobs[1] / "model.safetensors").write_bytes((jobs[0] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not make one model"):
        merge(jobs, tmp_path / "merged")


def test_a_job_of_every_block_writes_its_record(tmp_path):
    """One torchrun process owns every block: its job still leaves job.json, so the merge that follows works."""
    run = tmp_path / "job"
    results = train(tiny("dblocks", "train.steps=4", "train.blocks=0,1", "blocks.shared_stem_head=false",
              "dblocks.block_choice=round-robin"), run,
                    progress=False)
    assert io.load_json(run / "job.json")["finished"] and "test_accuracy" in results
    merge([run], tmp_path / "merged")
    load_model(tmp_path / "merged")
