"""What a run reports beside its files: messages (the `diffusionblocks` logger, and the plain stderr handler a
command adds when logging is not configured), the terminal progress bar, the provenance of a result (`provenance()`)
and an optional TensorBoard copy of the scalars in metrics.jsonl."""

from __future__ import annotations

import logging
import math
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .version import __version__

LOGGER = "diffusionblocks"  # the package's modules log to children of it (logging.getLogger(__name__))
log = logging.getLogger(__name__)
# the checkout the package runs from is the directory holding the package: looking further up would report the
# commit of whatever repository a virtual environment happens to sit in
CHECKOUT = Path(__file__).resolve().parent.parent
TENSORBOARD_ENV = "DIFFUSIONBLOCKS_TENSORBOARD"  # set (not "0") to write TensorBoard events beside metrics.jsonl
TENSORBOARD_DIR = "tensorboard"


# -- messages ------------------------------------------------------------------------------------------


class StderrHandler(logging.StreamHandler):
    """Messages as plain lines on whatever sys.stderr is when each is written (so a later redirection or capture is
    followed), warnings marked "warning: "; a progress bar's unfinished line is ended first."""

    line_open = False  # a progress bar drew a line on stderr without ending it

    def __init__(self):
        super().__init__()
        self.setFormatter(_Plain())

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns one; this handler always answers sys.stderr
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if StderrHandler.line_open:
            StderrHandler.line_open = False
            self.stream.write("\n")
        super().emit(record)


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def setup() -> None:
    """The package's messages (INFO and up) to stderr as plain lines, unless logging is configured already: a handler
    on the package's logger, or a root handler writing to the terminal. Called when a run starts, never on import,
    so a program's own logging configuration wins; calling it again adds nothing."""
    logger = logging.getLogger(LOGGER)
    if logger.handlers or any(_to_terminal(h) for h in logging.getLogger().handlers):
        return
    logger.addHandler(StderrHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def _to_terminal(handler: logging.Handler) -> bool:
    return getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


# -- the progress bar ----------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr, redrawn at most every `interval` seconds and at the last step (a line every
    10% through the logger when stderr is not a terminal). It shows the mean loss of the steps since the last
    redraw and the steps per second of this session (a resumed run counts from the step it resumed at)."""

    def __init__(self, total: int, label: str, enabled: bool = True, start: int = 0, *, interval: float = 0.2,
                 clock=time.perf_counter, tty: bool | None = None):
        self.total, self.label, self.enabled, self.interval, self.clock = total, label, enabled, interval, clock
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.start_step, self.start_time = start, clock()
        self.drawn_at, self.last_pct, self.width = self.start_time, -1, 0
        self.loss_sum, self.loss_n = 0.0, 0

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        loss = float(loss)
        if math.isfinite(loss):  # a skipped step's loss (inf or nan) is left out of the mean
            self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1
        now, last = self.clock(), step >= self.total
        if self.tty:
            if now - self.drawn_at < self.interval and not last:
                return
        else:
            pct = 10 * step // self.total
            if pct == self.last_pct and not last:
                return
            self.last_pct = pct
        line = self.line(step, now)
        self.drawn_at, self.loss_sum, self.loss_n = now, 0.0, 0
        if self.tty:
            self.width = max(self.width, len(line))  # spaces cover a longer earlier line
            sys.stderr.write("\r" + line.ljust(self.width) + ("\n" if last else ""))
            sys.stderr.flush()
            StderrHandler.line_open = not last
        else:
            log.info(line)

    def line(self, step: int, now: float) -> str:
        rate = (step - self.start_step) / max(now - self.start_time, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        loss = f"{self.loss_sum / self.loss_n:.4f}" if self.loss_n else "-"
        return (f"[{self.label}] {step}/{self.total} ({100 * step / self.total:.0f}%) loss {loss} {rate:.1f} step/s "
                f"eta {int(eta) // 60}:{int(eta) % 60:02d}")


# -- provenance ----------------------------------------------------------------------------------------


def utc_now() -> str:
    """Now, ISO 8601 in UTC to the second: 2026-01-31T12:00:00+00:00."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance(device: torch.device | str | None = None, started: str | None = None,
               resumed: list[dict] | None = None) -> dict:
    """Where a result came from, for results.json (and compare.json): the package version, the git commit when the
    package runs from a checkout (else None), torch and Python, the device, torch's threads, when it started
    (`started`, else now) and ended (now) in UTC, the sessions a resumed run continued in, and the command line."""
    now = utc_now()
    return {"diffusionblocks": __version__, "git_commit": git_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "device": None if device is None else str(device),
            "device_name": device_name(device), "threads": torch.get_num_threads(), "started": started or now,
            "ended": now, **({"resumed": resumed} if resumed else {}), "argv": list(sys.argv)}


_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # SHA-1, or SHA-256 in a repository of that format


def git_commit(checkout: str | os.PathLike = CHECKOUT) -> str | None:
    """The commit checked out in `checkout`, read from its .git (HEAD, the ref's file, packed-refs) without running
    git; None where there is no checkout or it cannot be read."""
    try:
        git = Path(checkout) / ".git"
        if git.is_file():  # a worktree or a submodule: "gitdir: PATH"
            text = git.read_text().strip()
            if not text.startswith("gitdir:"):
                return None
            git = Path(checkout) / text.removeprefix("gitdir:").strip()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):  # a detached HEAD holds the commit itself
            return head if _SHA.fullmatch(head) else None
        ref = head.removeprefix("ref:").strip()
        common = git / (git / "commondir").read_text().strip() if (git / "commondir").is_file() else git
        for root in dict.fromkeys((git, common)):  # a worktree's own refs, then the repository's
            if (root / ref).is_file():
                sha = (root / ref).read_text().strip()
                return sha if _SHA.fullmatch(sha) else None
        for root in dict.fromkeys((git, common)):
            if (root / "packed-refs").is_file():
                for line in (root / "packed-refs").read_text().splitlines():
                    sha, _, name = line.partition(" ")
                    if name.strip() == ref and _SHA.fullmatch(sha):
                        return sha
    except (OSError, UnicodeDecodeError):
        pass
    return None


def device_name(device: torch.device | str | None) -> str:
    """The accelerator's name for a CUDA device, else the CPU's model (read without starting a subprocess)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


# -- TensorBoard -------------------------------------------------------------------------------------


def tensorboard_wanted(flag: bool | None) -> bool:
    """`flag` when given, else whether $DIFFUSIONBLOCKS_TENSORBOARD is set to anything but 0/false/no/off."""
    if flag is not None:
        return flag
    return os.environ.get(TENSORBOARD_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _summary_writer():
    """torch's SummaryWriter class; ImportError without the tensorboard package."""
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter


class TensorBoard:
    """Every number of each metrics.jsonl record (loss, lr, per-block loss and gradient norm, evaluations) as a
    TensorBoard scalar against the record's step, in RUN/tensorboard (`pip install diffusionblocks[tensorboard]`)."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, run: Path, resumed_at: int = 0) -> TensorBoard | None:
        """The sink of a run (resumed at step `resumed_at`, 0 for a new one); None, with a one-line warning, where
        the tensorboard package is missing."""
        try:
            writer_cls = _summary_writer()
        except ImportError:
            log.warning("TensorBoard events were asked for but the tensorboard package is not installed: none are "
                        "written (pip install tensorboard)")
            return None
        # on a resume the events a killed session wrote after the checkpoint are hidden, as metrics.jsonl drops them
        purge = resumed_at + 1 if resumed_at else None
        return cls(writer_cls(log_dir=str(run / TENSORBOARD_DIR), purge_step=purge))

    def write(self, record: dict) -> None:
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self.writer.close()


def scalars(record: dict, prefix: str = ""):
    """(tag, number) for each number in a metrics record but its step; nested keys and list indices joined by "/"
    (blocks/0/loss, block_updates/1)."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if tag == "step" or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            yield tag, value
        elif isinstance(value, dict):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, list):
            yield from scalars(dict(enumerate(value)), f"{tag}/")
