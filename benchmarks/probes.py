"""Adversarial probes of the command line: user mistakes, damaged files, races, unbounded requests.

Each probe runs `python -m diffusionblocks ...` in a scratch folder (one process at a time, OMP_NUM_THREADS=1) and is
classed by what a user would see: ok (it did what was asked), clean error (exit 2 and one `error:` line), traceback,
wrong (exit 0 where a refusal was due, or a file that had to survive changed), data loss, code execution (a data
file's payload ran) or unbounded (still running at the time limit). Writes probes.json beside --out.

    python benchmarks/probes.py --out runs/probes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DB = [sys.executable, "-m", "diffusionblocks"]
LIMIT = 90  # seconds a probe may run before it counts as unbounded


def run(args, cwd, timeout=LIMIT, extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(extra or {}))
    try:
        p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        return None, ""


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"


def classify(code, text, want: str, kept: dict[Path, str]) -> str:
    if code is None:
        return "unbounded"
    if "Traceback (most recent call last)" in text:
        return "traceback"
    if any(digest(p) != h for p, h in kept.items()):
        return "data loss"
    if code == 2 and "error:" in text and want in ("error", "either"):
        return "clean error"
    return "ok" if code == 0 and want in ("ok", "either") else "wrong"


class Evil:  # a pickle payload: unpickling it would create the marker file
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/probes")
    ap.add_argument("--only", default="", help="run the probes whose name contains one of these (comma-separated)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    w = Path(tempfile.mkdtemp(prefix="probes-"))
    tiny = ["--preset", "tiny", "--no-progress", "train.steps=4"]

    # what the probes read: finished runs of a classifier, an image generator, masked and autoregressive text models
    setup = [
        DB + ["train", *tiny, "--out", "cls"],
        DB + ["train", "--preset", "gen-tiny", "--no-progress", "train.steps=4", "--out", "gen"],
        DB + ["train", "--preset", "lm-tiny", "--task", "arlm", "--method", "e2e", "--no-progress", "train.steps=4",
              "--out", "ar"],
        DB + ["train", *tiny, "--method", "dblocks", "--blocks", "0", "blocks.shared_stem_head=false",
              "dblocks.block_choice=round-robin", "--out", "job0"],
        DB + ["train", *tiny, "--method", "dblocks", "--blocks", "1", "blocks.shared_stem_head=false",
              "dblocks.block_choice=round-robin", "--out", "job1"],
    ]
    for cmd in setup:
        code, text = run(cmd, w, timeout=600)
        if code != 0:
            sys.exit(f"setup failed: {' '.join(cmd)}\n{text[-2000:]}")
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[..., None] * 16).astype(np.uint8)  # N x H x W x C
    np.savez(w / "mine.npz", x_train=x[:1500], y_train=d.target[:1500], x_test=x[1500:], y_test=d.target[1500:])
    (w / "afile").write_text("x")
    (w / "corpus.txt").write_text("the king and the queen walk in the garden. " * 400)
    (w / "dirlike").mkdir()

    def copy_run(src, dst):
        shutil.copytree(w / src, w / dst, dirs_exist_ok=True)
        return w / dst

    def edit_weights(run, how):
        from safetensors.torch import load_file, save_file
        path = w / run / "model.safetensors"
        t = load_file(path)
        k = next(iter(t))
        t[k] = t[k].long() if how == "int64" else t[k].fill_(float("nan"))
        save_file(t, path, metadata={"step": "4"})

    def edit_state(run, step=None, replace=None):
        path = w / run / "state.pt"
        if replace is not None:
            torch.save(replace, path)
            return
        s = torch.load(path, weights_only=True)
        s["step"] = step
        torch.save(s, path)

    def cifar_payload():
        folder = w / "cifar" / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (folder / name).write_bytes(pickle.dumps(Evil(str(w / "PWNED"))))

    P = []  # (name, argv, want, prepare, files that must survive)

    def probe(name, argv, want="error", prepare=None, keep=()):
        P.append((name, argv, want, prepare, keep))

    # --out mistakes
    probe("train --out under a file", ["train", *tiny, "--out", "afile/run"])
    probe("train --out a broken link", ["train", *tiny, "--out", "broken"],
          prepare=lambda: (w / "broken").symlink_to(w / "nowhere") if not (w / "broken").is_symlink() else None)
    probe("train --out /proc (unwritable)", ["train", *tiny, "--out", "/proc/run"])
    probe("train over a run without --overwrite", ["train", *tiny, "--out", "cls"], keep=("cls/model.safetensors",))
    # config values
    for override in ("model.dropout=nan", "train.steps=1e400", "train.steps=1e30", "model.depth=100000000",
                     "train.clip=nan", "train.clip=-1", "train.weight_decay=nan", "train.lr=inf",
                     "train.batch_size=100000", "model.width=0"):
        probe(f"train {override}", ["train", *tiny, "--out", f"bad-{override}", override])
    probe("eval --sigma-start out of range", ["eval", "cls", "--sigma-start", "1e9"])
    # damaged run files
    probe("eval: config.json malformed", ["eval", "c1"],
          prepare=lambda: (copy_run("cls", "c1") / "config.json").write_text("{"))
    probe("eval: config.json a list", ["eval", "c2"],
          prepare=lambda: (copy_run("cls", "c2") / "config.json").write_text("[1, 2]"))
    probe("eval: config.json without its dblocks section", ["eval", "c3"], want="either",
          prepare=lambda: (copy_run("cls", "c3") / "config.json").write_text(json.dumps(
              {k: v for k, v in json.loads((w / "cls" / "config.json").read_text()).items() if k != "dblocks"})))
    probe("eval: int64 weights", ["eval", "c4"], prepare=lambda: (copy_run("cls", "c4"), edit_weights("c4", "int64")))
    probe("eval: NaN weights", ["eval", "c5"], prepare=lambda: (copy_run("cls", "c5"), edit_weights("c5", "nan")))
    probe("resume: state.pt a list", ["train", "--resume", "c6", "--no-progress"],
          prepare=lambda: (copy_run("cls", "c6"), edit_state("c6", replace=[1, 2])))
    probe("resume: state.pt step 1e9", ["train", "--resume", "c7", "--no-progress"],
          prepare=lambda: (copy_run("cls", "c7"), edit_state("c7", step=10**9)))
    probe("resume: state.pt step -5", ["train", "--resume", "c8", "--no-progress"],
          prepare=lambda: (copy_run("cls", "c8"), edit_state("c8", step=-5)))
    probe("resume: torn checkpoint (weights of step 4, state of step 2)", ["train", "--resume", "c9", "--no-progress"],
          prepare=lambda: (copy_run("cls", "c9"), edit_state("c9", step=2)))
    probe("resume: a garbled metrics line", ["train", "--resume", "c10", "--no-progress"], want="ok",
          prepare=lambda: (copy_run("cls", "c10"), edit_state("c10", step=2), _restep(w / "c10", 2),
                           (w / "c10" / "metrics.jsonl").write_text('{"step": 1}\n{garbled\n{"step": 2}\n')))
    def stale_lock(folder, content):
        (w / folder).mkdir(exist_ok=True)
        (w / folder / ".lock").write_text(content)

    for i, content in enumerate(("", "garbled{", "[1, 2]")):
        probe(f"train into a folder whose .lock holds {content!r}", ["train", *tiny, "--out", f"lock{i}"],
              want="ok", prepare=lambda i=i, c=content: stale_lock(f"lock{i}", c))
    # sample
    probe("sample --out a run's own weights", ["sample", "gen", "--out", "gen/model.safetensors", "--overwrite"],
          keep=("gen/model.safetensors",))
    probe("sample --out an existing file", ["sample", "gen", "--out", "afile"], keep=("afile",))
    probe("sample --npz over a dataset", ["sample", "gen", "--out", "mine.png", "--npz"], keep=("mine.npz",))
    probe("sample --out a directory", ["sample", "gen", "--out", "dirlike"])
    probe("sample --num 100000000", ["sample", "gen", "--out", "big.png", "--num", "100000000"])
    probe("arlm sample --length 1000000000", ["sample", "ar", "--out", "long.txt", "--length", "1000000000"])
    probe("arlm sample, prompt outside the vocabulary", ["sample", "ar", "--out", "p.txt", "--prompt", "€€"],
          want="ok")  # a bytes tokenizer: every character has its tokens
    # memory
    probe("memory --out a file", ["memory", "--preset", "tiny", "--blocks", "2", "--out", "afile", "--no-progress"])
    probe("memory --device tpu", ["memory", "--preset", "tiny", "--blocks", "2", "--device", "tpu", "--no-progress"])
    # compare
    probe("compare --methods e2e,e2e", ["compare", "--preset", "tiny", "--methods", "e2e,e2e", "--seeds", "0",
                                        "--out", "cmp", "--no-progress", "train.steps=4"])
    probe("compare --seeds 0,0", ["compare", "--preset", "tiny", "--methods", "e2e", "--seeds", "0,0", "--out", "cmp",
                                  "--no-progress", "train.steps=4"])
    probe("compare (first)", ["compare", "--preset", "tiny", "--methods", "e2e", "--seeds", "0", "--out", "cmp",
                              "--no-progress", "train.steps=4"], want="ok")
    probe("compare again with train.threads=1", ["compare", "--preset", "tiny", "--methods", "e2e", "--seeds", "0",
                                                 "--out", "cmp", "--no-progress", "train.steps=4", "train.threads=1"],
          want="ok", keep=("cmp/e2e-seed0/model.safetensors",))
    probe("compare again with train.lr changed", ["compare", "--preset", "tiny", "--methods", "e2e", "--seeds", "0",
                                                  "--out", "cmp", "--no-progress", "train.steps=4", "train.lr=1e-3"],
          keep=("cmp/e2e-seed0/model.safetensors",))
    # merge and torchrun
    probe("merge a job holding another block's weights", ["merge", "j0", "j1", "--out", "merged"],
          prepare=lambda: (copy_run("job0", "j0"), copy_run("job1", "j1"),
                           shutil.copy(w / "job0" / "model.safetensors", w / "j1" / "model.safetensors")))
    probe("torchrun --nproc-per-node 1 --parallel blocks",
          [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
           "diffusionblocks", "train", *tiny, "--method", "dblocks", "blocks.shared_stem_head=false",
           "dblocks.block_choice=round-robin", "--parallel", "blocks", "--out", "par1"], want="ok")
    # data
    probe("CIFAR batch with a pickle payload", ["train", *tiny, "--data", "cifar10", "data.root=cifar",
                                                "--out", "cifar-run"], prepare=cifar_payload)
    probe("npz run evaluated from another folder", ["eval", str(w / "npzrun")], want="ok",
          prepare=lambda: run(DB + ["train", *tiny, "--data", "mine.npz", "--out", "npzrun"], w))
    probe("npz run evaluated after its data changed", ["eval", str(w / "npzrun")],
          prepare=lambda: np.savez(w / "mine.npz", x_train=x[:1400], y_train=d.target[:1400], x_test=x[1400:],
                                   y_test=d.target[1400:]))
    probe("text run evaluated after its corpus changed", ["eval", "txtrun"],
          prepare=lambda: (run(DB + ["train", "--preset", "lm-tiny", "--data", "corpus.txt", "--no-progress",
                                     "train.steps=2", "--out", "txtrun"], w),
                           (w / "corpus.txt").write_text((w / "corpus.txt").read_text() + "more text. " * 50)))
    probe("a directory as the corpus", ["train", "--preset", "lm-tiny", "--data", "dirlike", "--no-progress",
                                        "--out", "dircorpus"])
    probe("tokenizer_file a directory", ["train", "--preset", "lm-tiny", "--data", "corpus.txt", "--no-progress",
                                         "data.tokenizer=bpe", "data.tokenizer_file=dirlike", "--out", "tokdir"])

    rows = []
    for name, argv, want, prepare, keep in P:
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        if prepare is not None:
            prepare()
        kept = {w / k: digest(w / k) for k in keep}
        command = argv if argv[0] == sys.executable else DB + argv
        t0 = time.perf_counter()
        code, text = run(command, w, extra=None)
        verdict = classify(code, text, want, kept)
        if (w / "PWNED").exists():
            verdict = "code execution"
        if "from another folder" in name:  # run from the scratch folder's parent
            code, text = run(command, w.parent)
            verdict = classify(code, text, want, kept)
        last = [line for line in text.strip().splitlines() if line.strip()][-1:] or [""]
        rows.append({"probe": name, "expected": want, "verdict": verdict, "exit": code,
                     "seconds": round(time.perf_counter() - t0, 1), "last_line": last[0][:200]})
        print(f"{verdict:>14}  {name}  [{code}] {last[0][:110]}", flush=True)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in dict.fromkeys(r["verdict"] for r in rows)}
    print("totals:", ", ".join(f"{n} {v}" for v, n in counts.items()))
    (out / "probes.json").write_text(json.dumps({"totals": counts, "probes": rows}, indent=2) + "\n")
    shutil.rmtree(w, ignore_errors=True)


def _restep(run: Path, step: int):
    """Rewrite the weights' recorded step (a whole checkpoint of another step) so only metrics.jsonl is damaged."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(run / "model.safetensors", "pt") as f:
        meta = dict(f.metadata() or {})
    save_file(load_file(run / "model.safetensors"), run / "model.safetensors", metadata=dict(meta, step=str(step)))


if __name__ == "__main__":
    main()
