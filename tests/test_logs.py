"""What a run reports beside its files: provenance (the git commit read without git), messages through the logger,
the progress bar (rate-limited, mean loss, resume-correct), the thread warnings and default, the TensorBoard sink."""

import importlib
import logging
import math
import platform
import re
import signal
import sys
from datetime import datetime, timezone

import pytest
import torch
from conftest import signal_on_step

from diffusionblocks import io, logs
from diffusionblocks.config import apply_overrides
from diffusionblocks.data import DataError
from diffusionblocks.methods.e2e import EndToEnd
from diffusionblocks.tasks.classify import preset_tiny
from diffusionblocks.train import train

train_module = importlib.import_module("diffusionblocks.train")  # the package's `train` is the function

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def tiny(*overrides):
    """The tiny preset with no periodic evaluation unless asked for (they are most of a short run's time)."""
    return apply_overrides(preset_tiny(), ["train.eval_every=1000", *overrides])


# -- provenance ------------------------------------------------------------------------------------------


def test_the_git_commit_is_read_from_dot_git_without_git(tmp_path):
    git = tmp_path / "repo" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    assert logs.git_commit(tmp_path / "repo") is None  # a branch with no commit yet
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{OTHER} refs/heads/dev\n{SHA} refs/heads/main\n")
    assert logs.git_commit(tmp_path / "repo") == SHA
    (git / "refs" / "heads" / "main").write_text(OTHER + "\n")  # a loose ref wins over the packed one
    assert logs.git_commit(tmp_path / "repo") == OTHER
    (git / "HEAD").write_text(SHA + "\n")  # detached
    assert logs.git_commit(tmp_path / "repo") == SHA
    # a worktree: .git is a file naming its git dir, whose refs live in the main repository (commondir)
    wt = git / "worktrees" / "wt"
    wt.mkdir(parents=True)
    (wt / "HEAD").write_text("ref: refs/heads/dev\n")
    (wt / "commondir").write_text("../..\n")
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / ".git").write_text(f"gitdir: {wt}\n")
    assert logs.git_commit(tmp_path / "wt") == OTHER
    (git / "HEAD").write_text("garbage\n")
    assert logs.git_commit(tmp_path / "repo") is None
    assert logs.git_commit(tmp_path / "nowhere") is None


def test_provenance_names_versions_device_times_and_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["diffusionblocks", "train", "--out", "runs/x"])
    p = logs.provenance("cpu", "2026-01-31T12:00:00+00:00", resumed=[{"started": None, "step": 3}])
    assert p["torch"] == torch.__version__ and p["python"] == platform.python_version()
    assert p["diffusionblocks"] == logs.__version__ and p["device"] == "cpu" and p["device_name"]
    assert p["argv"] == ["diffusionblocks", "train", "--out", "runs/x"] and p["threads"] == torch.get_num_threads()
    assert p["started"] == "2026-01-31T12:00:00+00:00" and p["resumed"] == [{"started": None, "step": 3}]
    ended = datetime.fromisoformat(p["ended"])
    assert ended.utcoffset().total_seconds() == 0 and abs((datetime.now(timezone.utc) - ended).total_seconds()) < 60
    assert p["git_commit"] == logs.git_commit()
    if (logs.CHECKOUT / ".git").exists():  # running from this checkout
        assert re.fullmatch("[0-9a-f]{40}", p["git_commit"])
    assert logs.provenance()["device"] is None and "resumed" not in logs.provenance()  # what compare.json records


def test_a_resumed_run_records_its_sessions(tmp_path, monkeypatch):
    cfg = tiny("train.method=e2e", "train.steps=6", "train.ckpt_every=1000")
    original = signal_on_step(monkeypatch, EndToEnd, 4, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(EndToEnd, "step", original)
    started = io.load_torch(tmp_path / "run" / "state.pt")["sessions"][0]["started"]
    train(None, tmp_path / "run", resume=True, progress=False)
    p = io.load_json(tmp_path / "run" / "results.json")["provenance"]
    assert p["started"] == started and [s["step"] for s in p["resumed"]] == [4]
    assert p["started"] <= p["resumed"][0]["started"] <= p["ended"] and p["torch"] == torch.__version__


# -- messages --------------------------------------------------------------------------------------------


def test_messages_go_to_stderr_unless_logging_is_configured(monkeypatch, capsys):
    package, root = logging.getLogger("diffusionblocks"), logging.getLogger()
    monkeypatch.setattr(package, "handlers", [])
    monkeypatch.setattr(root, "handlers", [logging.StreamHandler(sys.stderr)])  # the program's own logging
    logs.setup()
    assert package.handlers == []
    monkeypatch.setattr(root, "handlers", [])
    logs.setup()
    logs.setup()  # once
    assert [type(h) for h in package.handlers] == [logs.StderrHandler]
    log = logging.getLogger("diffusionblocks.train")
    log.info("plain")
    logs.StderrHandler.line_open = True  # a progress bar's line is open: the message starts on a line of its own
    log.warning("block(s) [1] received no update")
    assert capsys.readouterr().err == "plain\n\nwarning: block(s) [1] received no update\n"
    assert not logs.StderrHandler.line_open


# -- the progress bar ------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_bar_redraws_a_few_times_a_second_with_the_mean_loss(capsys):
    clock, loss = Clock(), lambda step: float(step % 3)  # a noisy loss
    bar = logs.Progress(1000, "dblocks", clock=clock, tty=True)
    for step in range(1, 1001):  # 1,000 steps of 1 ms: one second
        clock.now += 0.001
        bar.update(step, loss(step))
    err = capsys.readouterr().err
    draws = err.split("\r")[1:]
    assert 4 <= len(draws) <= 1 / 0.2 + 1 and err.endswith("\n")  # at most every 0.2 s, and the last step
    assert draws[-1].startswith("[dblocks] 1000/1000 (100%) loss ") and " 1000.0 step/s eta 0:00" in draws[-1]
    previous = 0
    for draw in draws:  # each shows the mean loss of the steps since the one before, not one step's loss
        step, shown = re.match(r"\[dblocks\] (\d+)/1000 .* loss ([0-9.]+) ", draw).groups()
        since = [loss(s) for s in range(previous + 1, int(step) + 1)]
        assert shown == f"{sum(since) / len(since):.4f}" and int(step) - previous >= 199
        previous = int(step)
    assert not logs.StderrHandler.line_open


def test_the_bar_counts_the_rate_from_the_step_a_run_resumed_at(capsys):
    clock = Clock()
    bar = logs.Progress(1000, "e2e", start=900, clock=clock, tty=True)
    clock.now += 10.0
    bar.update(950, float("inf"))  # a skipped step's loss is left out of the mean
    assert capsys.readouterr().err == "\r[e2e] 950/1000 (95%) loss - 5.0 step/s eta 0:10"
    assert logs.StderrHandler.line_open
    logs.StderrHandler.line_open = False


def test_the_bar_without_a_terminal_logs_a_line_every_ten_percent(capsys, monkeypatch):
    monkeypatch.setattr(logging.getLogger("diffusionblocks"), "handlers", [])
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    logs.setup()
    clock = Clock()
    bar = logs.Progress(200, "e2e", clock=clock, tty=False)
    for step in range(1, 201):
        clock.now += 0.5
        bar.update(step, 2.0)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 11 and lines[-1] == "[e2e] 200/200 (100%) loss 2.0000 2.0 step/s eta 0:00"


# -- threads -----------------------------------------------------------------------------------------------


@pytest.fixture
def quiet_machine(monkeypatch, tmp_path):
    """Thread warnings not yet given in this process; a machine of 4 cores with nothing else running."""
    monkeypatch.setattr(train_module, "_warned", set())
    monkeypatch.setattr(train_module, "_load_sampled", -math.inf)
    monkeypatch.setattr(train_module.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(train_module.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(train_module, "CPU_MAX", tmp_path / "missing")
    load = tmp_path / "loadavg"
    load.write_text("0.50 0.40 0.30 1/300 4242\n")  # only the thread reading it runs
    monkeypatch.setattr(train_module, "LOADAVG", load)
    monkeypatch.setattr(logging.getLogger("diffusionblocks"), "handlers", [])
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    logs.setup()
    return load


def test_more_threads_than_usable_cores_are_warned_about_with_the_fix(quiet_machine, monkeypatch, capsys):
    train_module.check_threads(4)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(train_module.os, "sched_getaffinity", lambda pid: {0, 1})  # taskset, Slurm
    train_module.check_threads(4)
    train_module.check_threads(4)  # once per process
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "may use 2 core(s)" in err
    assert "train.threads=2" in err and "OMP_NUM_THREADS=2" in err


def test_a_container_quota_caps_the_usable_cores_and_the_default_threads(quiet_machine, monkeypatch, tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # --cpus=1.5
    monkeypatch.setattr(train_module, "CPU_MAX", tmp_path / "cpu.max")
    assert train_module.usable_cores() == 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert train_module.run_threads(0) == 2  # torch's default, capped at the usable cores
        assert train_module.run_threads(3) == 3  # train.threads as set
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert train_module.run_threads(0) == 3  # the user's own choice stands
    finally:
        torch.set_num_threads(threads)


def test_other_processes_competing_for_the_cores_are_warned_about(quiet_machine, capsys):
    quiet_machine.write_text("4.10 3.80 3.20 4/300 4242\n")  # three other threads runnable now
    train_module.check_threads(2)
    err = capsys.readouterr().err
    assert "other processes keep 3 thread(s) busy on this machine's 4 core(s)" in err
    assert "train.threads=1" in err and "OMP_NUM_THREADS=1" in err


def test_the_load_is_sampled_again_only_a_minute_after_the_last_sample(quiet_machine, monkeypatch, capsys):
    """A process's runs in quick succession (a compare's arms of a few seconds, a test suite) sample the machine's
    load once: each sample sleeps 30 ms."""
    now = [1000.0]
    monkeypatch.setattr(train_module.time, "monotonic", lambda: now[0])
    train_module.check_threads(2)  # quiet: no warning, sampled now
    quiet_machine.write_text("4.10 3.80 3.20 4/300 4242\n")  # then three other threads start
    now[0] += train_module.LOAD_RECHECK - 1
    train_module.check_threads(2)
    assert capsys.readouterr().err == ""  # not sampled again yet
    now[0] += 1
    train_module.check_threads(2)
    assert "other processes keep 3 thread(s) busy" in capsys.readouterr().err


def test_a_train_warns_before_it_reads_the_data(quiet_machine, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(train_module.os, "sched_getaffinity", lambda pid: {0})
    threads = torch.get_num_threads()
    with pytest.raises(DataError, match="not found"):
        train(tiny("train.threads=2", f"data.name={tmp_path / 'missing.npz'}"), tmp_path / "run", progress=False)
    assert "train.threads=1" in capsys.readouterr().err and torch.get_num_threads() == threads  # and put back


# -- TensorBoard -------------------------------------------------------------------------------------------


class FakeWriter:
    made: list = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    FakeWriter.made = []
    monkeypatch.setattr(logs, "_summary_writer", lambda: FakeWriter)
    return FakeWriter


def test_tensorboard_gets_the_scalars_of_metrics_jsonl(tmp_path, fake_tensorboard, monkeypatch):
    monkeypatch.setenv(logs.TENSORBOARD_ENV, "1")
    run = tmp_path / "run"
    train(tiny("train.method=dblocks", "train.steps=4", "train.log_every=2", "train.eval_every=4"), run,
          progress=False)
    (writer,) = fake_tensorboard.made
    assert writer.log_dir == str(run / "tensorboard") and writer.purge_step is None and writer.closed
    got = {(tag, step): value for tag, value, step in writer.scalars}
    records = io.read_jsonl(run / "metrics.jsonl")
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [2, 4, 6, 8]
    for r in losses:
        assert got["loss", r["step"]] == r["loss"] and got["lr", r["step"]] == r["lr"]
        for b, v in r["blocks"].items():
            assert got[f"blocks/{b}/loss", r["step"]] == v["loss"]
            assert got[f"blocks/{b}/grad_norm", r["step"]] == v["grad_norm"]
    evals = [r for r in records if "eval_accuracy" in r]
    assert evals and all(got["eval_accuracy", r["step"]] == r["eval_accuracy"] for r in evals)
    assert len(writer.scalars) == sum(len(list(logs.scalars(r))) for r in records)  # nothing else
    monkeypatch.setenv(logs.TENSORBOARD_ENV, "0")
    train(tiny("train.method=e2e", "train.steps=2"), tmp_path / "off", progress=False)
    assert len(fake_tensorboard.made) == 1


def test_tensorboard_on_resume_and_without_the_package(tmp_path, fake_tensorboard, monkeypatch, capsys):
    sink = logs.TensorBoard.open(tmp_path, resumed_at=17)
    assert sink.writer.purge_step == 18  # what a killed session wrote after the checkpoint is hidden
    monkeypatch.delenv(logs.TENSORBOARD_ENV, raising=False)
    monkeypatch.setattr(logging.getLogger("diffusionblocks"), "handlers", [])
    monkeypatch.setattr(logging.getLogger(), "handlers", [])

    def missing():
        raise ImportError("TensorBoard logging requires TensorBoard")

    monkeypatch.setattr(logs, "_summary_writer", missing)
    results = train(tiny("train.method=e2e", "train.steps=2"), tmp_path / "run", progress=False, tensorboard=True)
    err = capsys.readouterr().err
    assert results["steps"] == 2 and err.count("tensorboard package is not installed") == 1
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_tensorboard_writes_real_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    train(tiny("train.method=e2e", "train.steps=4", "train.log_every=2"), run, progress=False, tensorboard=True)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = [r["loss"] for r in io.read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [e.step for e in events.Scalars("loss")] == [2, 4]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(losses)
