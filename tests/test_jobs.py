"""Blocks trained apart: per-block jobs, merge, torchrun --parallel blocks, resuming a killed job.

The strongest guarantee: a sequential run, per-block jobs merged afterwards and a block-parallel torchrun
give bit-identical weights (one thread per process everywhere: CPU matmul sums depend on the thread count).
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import signal_on_step

from diffusionblocks import io
from diffusionblocks.cli import main
from diffusionblocks.config import apply_overrides
from diffusionblocks.data import load_dataset
from diffusionblocks.jobs import merge
from diffusionblocks.methods.dblocks import DBlocks, owned_blocks
from diffusionblocks.parallel import rank_blocks, train_parallel
from diffusionblocks.run import load_model
from diffusionblocks.tasks.classify import preset_tiny
from diffusionblocks.train import train

pytest.importorskip("sklearn", reason="the tiny preset trains on scikit-learn's digits")

# the benchmark's CollectiveMeter and its torchrun worker, which counts what each rank hands to collectives
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "parallel_bench.py"
_spec = importlib.util.spec_from_file_location("parallel_bench", BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

COMMON = ["train.method=dblocks", "blocks.num_blocks=2", "blocks.shared_stem_head=false",
          "dblocks.block_choice=sequential", "train.steps=6", "train.threads=1", "train.ema=0.9",
          "data.test_limit=40", "train.eval_limit=40"]  # and data.name=<the digits as an .npz>, from the fixture below


@pytest.fixture(scope="module", autouse=True)
def digits_npz(tmp_path_factory):
    """The tiny preset's data (scikit-learn's digits, its split) as an .npz, which every run here trains on: a
    torchrun worker then reads a file where it would import scikit-learn (a second of CPU per process)."""
    d = load_dataset("digits")
    path = tmp_path_factory.mktemp("data") / "digits.npz"  # its stem names the FD reference: fd-digits, as for digits
    np.savez(path, x_train=d.x_train[:, 0].numpy(), y_train=d.y_train.numpy(), x_test=d.x_test[:, 0].numpy(),
             y_test=d.y_test.numpy())
    COMMON.append(f"data.name={path}")
    yield
    COMMON.pop()


def cfg_with(*overrides):
    return apply_overrides(preset_tiny(), COMMON + list(overrides))


def weights(run, name="model.safetensors"):
    return io.load_safetensors(run / name)[0]


def same(a, b):
    if a.keys() != b.keys():
        print(f"different keys: {sorted(set(a) ^ set(b))[:5]}")
        return False
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    if differ:  # shown by pytest on failure
        print(f"{len(differ)} tensors differ, e.g. {differ[0]}: max |diff| {(a[differ[0]] - b[differ[0]]).abs().max()}")
    return not differ


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    train(cfg_with(), root / "sequential", progress=False)
    for b in (0, 1):
        train(cfg_with(f"train.blocks={b}"), root / f"block{b}", progress=False)
    return root


def test_per_block_jobs_merge_to_the_sequential_run(runs, tmp_path):
    record = merge([runs / "block1", runs / "block0"], tmp_path / "merged")
    assert record["owner"] == {"0": str(runs / "block0"), "1": str(runs / "block1")} and record["missing"] == []
    for name in ("model.safetensors", "ema.safetensors"):
        assert same(weights(runs / "sequential", name), weights(tmp_path / "merged", name)), name
    # the merged run evaluates like any run
    assert main(["eval", str(tmp_path / "merged"), "--json"]) == 0
    assert load_model(tmp_path / "merged")[1] is not None


def test_round_robin_and_sequential_train_the_same_independent_blocks(runs, tmp_path):
    train(cfg_with("dblocks.block_choice=round-robin"), tmp_path / "rr", progress=False)
    assert same(weights(runs / "sequential"), weights(tmp_path / "rr"))


def test_a_job_holds_only_its_blocks(runs):
    job = io.load_json(runs / "block1" / "job.json")
    assert job["blocks"] == [1] and job["num_blocks"] == 2 and job["finished"]
    assert len(job["partition"]["boundaries"]) == 3 and job["architecture"]["depth"] == 4
    keys = weights(runs / "block1").keys()
    assert any(k.startswith("stack.blocks.1.") for k in keys)
    assert not any(k.startswith("stack.blocks.0.") or k.startswith("readouts.0.") for k in keys)
    with pytest.raises(ValueError, match="per-block job"):
        load_model(runs / "block1")


def test_merge_refuses_what_is_not_one_model(runs, tmp_path):
    with pytest.raises(ValueError, match="owned by both"):
        merge([runs / "block0", runs / "block0"], tmp_path / "m1")
    with pytest.raises(ValueError, match=r"block\(s\) \[1\]"):
        merge([runs / "block0"], tmp_path / "m2")
    other = tmp_path / "wider"
    train(cfg_with("train.blocks=1", "model.width=48"), other, progress=False)
    with pytest.raises(ValueError, match="architecture differs.*width"):
        merge([runs / "block0", other], tmp_path / "m3")
    reseeded = tmp_path / "reseeded"
    train(cfg_with("train.blocks=1", "train.seed=5"), reseeded, progress=False)
    with pytest.raises(ValueError, match="configs differ.*seed"):
        merge([runs / "block0", reseeded], tmp_path / "m4")
    with pytest.raises(ValueError, match="not a per-block job"):
        merge([runs / "block0", runs / "sequential"], tmp_path / "m5")
    assert main(["merge", str(runs / "block0"), "--out", str(tmp_path / "m6")]) == 2
    # issue 16, item 4: onto one of its inputs, or onto a trained run (whose --resume it would break), it refuses
    # before writing anything
    before = weights(runs / "block0")
    with pytest.raises(ValueError, match="one of the jobs being merged"):
        merge([runs / "block0", runs / "block1"], runs / "block0")
    with pytest.raises(ValueError, match=r"holds a run \(state.pt"):
        merge([runs / "block0", runs / "block1"], runs / "sequential")
    assert same(weights(runs / "block0"), before) and "merged_from" not in str(io.load_safetensors(
        runs / "sequential" / "model.safetensors")[1])


def test_merge_with_missing_blocks_only_when_allowed(runs, tmp_path, capsys):
    record = merge([runs / "block0"], tmp_path / "partial", allow_missing=True)
    assert record["missing"] == [1]
    assert "WARNING" in capsys.readouterr().err
    fresh = weights(runs / "sequential")
    merged = weights(tmp_path / "partial")
    assert all(torch.equal(merged[k], v) for k, v in weights(runs / "block0").items())
    assert merged.keys() == fresh.keys()


def test_a_killed_job_resumes_and_the_merge_is_unchanged(runs, tmp_path, monkeypatch):
    original = signal_on_step(monkeypatch, DBlocks, 4, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_with("train.blocks=1"), tmp_path / "killed", progress=False)
    monkeypatch.setattr(DBlocks, "step", original)
    with pytest.raises(ValueError, match="has not finished.*--resume"):
        merge([runs / "block0", tmp_path / "killed"], tmp_path / "early")
    assert main(["train", "--resume", str(tmp_path / "killed"), "--no-progress"]) == 0
    merge([runs / "block0", tmp_path / "killed"], tmp_path / "late")
    assert same(weights(runs / "sequential"), weights(tmp_path / "late"))


def test_jobs_need_independent_blocks_and_a_fixed_share(tmp_path):
    with pytest.raises(ValueError, match="shared_stem_head=false"):
        train(cfg_with("train.blocks=0", "blocks.shared_stem_head=true"), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="block_choice=random"):
        train(cfg_with("train.blocks=0", "dblocks.block_choice=random"), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="do not exist"):
        owned_blocks(cfg_with("train.blocks=0,2"))
    with pytest.raises(ValueError, match="twice"):
        owned_blocks(cfg_with("train.blocks=1,1"))
    with pytest.raises(ValueError, match="needs --method dblocks"):
        train(cfg_with("train.blocks=0", "train.method=e2e"), tmp_path / "c", progress=False)
    assert rank_blocks(5, 2, 0) == [0, 2, 4] and rank_blocks(5, 2, 1) == [1, 3]
    with pytest.raises(ValueError, match="3 processes for 2 blocks"):
        rank_blocks(2, 3, 0)
    assert main(["train", "--method", "dblocks", "--parallel", "blocks", "--preset", "tiny", "--out",
                 str(tmp_path / "d"), "blocks.shared_stem_head=false"]) == 2  # not under torchrun


def _earlier_parallel_run(out):
    """What a 4-rank run leaves in OUT (its config, a score, rank directories), as far as replacing it matters."""
    for d in (out, out / "rank1", out / "rank3"):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    (out / "score.json").write_text("{}")
    (out / "rank7").mkdir()  # not a run: a user's folder that happens to be called so


def test_a_parallel_run_over_an_earlier_run_needs_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "old"
    _earlier_parallel_run(out)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="is not empty .*--overwrite"):  # refused before any process group
        train_parallel(cfg_with(), out, progress=False)
    assert (out / "score.json").exists() and (out / "rank3" / "config.json").exists()


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")

# A torchrun worker: `diffusionblocks ARGS` whose third step on each rank waits until that rank's SIGTERM has arrived,
# so the signal lands in the middle of training however slow the machine is (no race against the run finishing)
HELD_WORKER = '''
import os
import signal
import sys
import time
from pathlib import Path

from diffusionblocks.cli import main
from diffusionblocks.methods.dblocks import DBlocks

original, calls = DBlocks.step, []


def step(self, batch, block=None):
    calls.append(1)
    if len(calls) == 3:
        stop = signal.getsignal(signal.SIGTERM).__self__  # the training loop's StopRequest
        Path(sys.argv[1], "rank" + os.environ["RANK"]).touch()  # the test's cue to send the signal
        deadline = time.monotonic() + 120
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
    return original(self, batch, block)


DBlocks.step = step
sys.exit(main(sys.argv[2:]))
'''


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory):
    """One block-parallel torchrun run over what an earlier run left in OUT (--overwrite), stopped by SIGTERM to
    torchrun while both ranks wait in their third step, then finished by --resume under torchrun: what Slurm or
    Kubernetes do to a job. The tests below read it; what the stop left is recorded before the resume."""
    root = tmp_path_factory.mktemp("torchrun")
    out, held, worker = root / "par", root / "held", root / "worker.py"
    held.mkdir()
    worker.write_text(HELD_WORKER)
    _earlier_parallel_run(out)  # replaced: its files and its ranks beyond this run's go, a user's folder stays
    proc = subprocess.Popen([*TORCHRUN, "2", str(worker), str(held), "train", "--preset", "tiny", "--parallel",
                             "blocks", "--out", str(out), "--no-progress", "--overwrite", *COMMON],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    deadline = time.monotonic() + 120
    while len(list(held.iterdir())) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # the tests below say what went wrong
        proc.kill()
        _, err = proc.communicate()
    stopped = {"returncode": proc.returncode, "stderr": err, "held": sorted(p.name for p in held.iterdir()),
               "states": [(out / f"rank{r}" / "state.pt").exists() for r in (0, 1)],
               "results": (out / "results.json").exists()}
    resumed = subprocess.run([*TORCHRUN, "2", "-m", "diffusionblocks", "train", "--no-progress", "--resume", str(out)],
                             capture_output=True, text=True, timeout=240, env=ONE_THREAD)
    return out, stopped, resumed


def test_sigterm_to_torchrun_checkpoints_every_rank_and_the_run_resumes(parallel_run):
    """SIGTERM to torchrun, which passes it to its workers: every rank stops at a step boundary with a checkpoint,
    and --resume under torchrun finishes the run and merges it."""
    out, stopped, resumed = parallel_run
    err = stopped["stderr"]
    assert stopped["held"] == ["rank0", "rank1"], err[-3000:]  # the signal came while both ranks were training
    assert stopped["returncode"] != 0, "the run finished before the signal: nothing was tested"
    assert err.count("stopped by SIGTERM at step 3/6") == 2 and all(stopped["states"]), err[-3000:]
    assert f"torchrun --nproc_per_node 2 -m diffusionblocks train --resume {out}" in err
    assert not stopped["results"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resuming") == resumed.stderr.count("at step 3/6") == 2  # each rank, where it stopped
    assert io.load_json(out / "results.json")["layer_updates"] == 6 * 4


def test_torchrun_parallel_equals_sequential(runs, parallel_run):
    """The ranks' blocks, merged by rank 0, are the sequential run's to the bit (stopped and resumed on the way)."""
    out, _, resumed = parallel_run
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (out / "score.json").exists() and not (out / "rank3").exists() and (out / "rank7").is_dir()
    for name in ("model.safetensors", "ema.safetensors"):
        assert same(weights(runs / "sequential", name), weights(out, name)), (name, resumed.stderr[-2000:])
    results = io.load_json(out / "results.json")
    assert results["world_size"] == 2 and results["process_groups"] == [
        "default (config agreement at the start, results at the end)"]
    assert [r["blocks"] for r in results["ranks"]] == [[0], [1]]
    assert 0 <= results["test_accuracy"] <= 1 and results["layer_updates"] == 6 * 4


@pytest.fixture(scope="module")
def data_parallel_imagegen(tmp_path_factory):
    """Image generation on 4 ranks for 2 blocks (each block data-parallel over 2 ranks), each rank counting what it
    hands to collectives (the benchmark's metered worker); rank 0 merges and scores FD against a reference classifier
    trained once here (tiny) where the ranks look."""
    root = tmp_path_factory.mktemp("dp")
    out, counts, cache = root / "gen", root / "counts", root / "cache"
    ref = apply_overrides(preset_tiny(), ["train.method=e2e", "train.steps=20", "train.eval_limit=40"])
    train(ref, cache / "fd-digits", progress=False)
    trained_at = (cache / "fd-digits" / "model.safetensors").stat().st_mtime_ns
    cmd = [*TORCHRUN, "4", str(BENCH), "--metered", str(counts), "train", "--preset", "gen-tiny", "--task",
           "imagegen", "--parallel", "blocks", "--out", str(out), "--no-progress", *COMMON, "train.steps=3",
           "gen.fd_samples=40", "gen.steps=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=dict(ONE_THREAD, DIFFUSIONBLOCKS_CACHE=str(cache)))
    return out, counts, proc, cache, trained_at


def test_torchrun_more_ranks_than_blocks_is_data_parallel_inside_each_block(data_parallel_imagegen):
    out, counts, proc, _, _ = data_parallel_imagegen
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = io.load_json(out / "results.json")
    # measured at the collectives: the block groups' all_reduce of gradients, nothing between blocks but small
    # objects (the config hashes at the start, the ranks' results at the end)
    measured = bench.collective_bytes(bench.read_counts(counts), results)
    assert measured["gradient_bytes_between_blocks"] == 0 and measured["gradient_bytes_within_blocks"] > 0
    assert 0 < measured["object_bytes_between_blocks"] < 10_000
    per_rank = {r: {tuple(g["ranks"]): g for g in report} for r, report in bench.read_counts(counts).items()}
    assert per_rank[0][(0, 2)]["tensor_bytes"] == per_rank[2][(0, 2)]["tensor_bytes"] > 0  # both members sent
    assert per_rank[0][(0, 1, 2, 3)]["tensor_bytes"] == 0
    assert [r["blocks"] for r in results["ranks"]] == [[0], [1], [0], [1]]
    for b in (0, 1):  # the two ranks of a block end with the same weights: their gradients were averaged
        assert same(weights(out / f"rank{b}"), weights(out / f"rank{b + 2}"))
    assert io.load_json(out / "merge.json")["owner"] == {"0": str(out / "rank0"), "1": str(out / "rank1")}


def test_torchrun_imagegen_merges_and_reports_its_fd(data_parallel_imagegen):
    """Image generation spread over the ranks: rank 0 merges and scores the task's headline metric (FD)."""
    out, _, proc, cache, trained_at = data_parallel_imagegen
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = io.load_json(out / "results.json")
    assert results["task"] == "imagegen" and results["metric"] == "fd_classifier_features"
    assert results["fd_classifier_features"] > 0 and results["num_generated"] == 40
    assert [r["blocks"] for r in results["ranks"][:2]] == [[0], [1]]  # ranks 2, 3: the data-parallel test above
    assert "FD (classifier features)" in proc.stdout
    assert (cache / "fd-digits" / "model.safetensors").stat().st_mtime_ns == trained_at  # reused, not retrained


def test_with_dropout_a_block_still_does_not_depend_on_the_other_blocks(runs, tmp_path):
    """Dropout draws from each block's own stream: the order the blocks train in changes nothing."""
    cfg = lambda choice: cfg_with("model.dropout=0.2", f"dblocks.block_choice={choice}")
    train(cfg("sequential"), tmp_path / "seq", progress=False)
    train(cfg("round-robin"), tmp_path / "rr", progress=False)
    assert same(weights(tmp_path / "seq"), weights(tmp_path / "rr"))
    assert not same(weights(tmp_path / "seq"), weights(runs / "sequential"))  # dropout did act
