"""A trained run as a plain module for inference: classify images, sample images, generate and score text, with
no Task, Run or dataset in the user's hands.

`load(run_dir)` rebuilds the run's model (its EMA weights when it kept one, in eval mode) from the shapes the run
recorded at its start (shapes.json), so the dataset is not read; a run from before shapes were recorded is rebuilt
from its data as `load_model` does. The returned `Predictor` offers the methods of its run's task (the others raise
a one-line error naming what the run can do):

    from diffusionblocks import load_preset, train
    from diffusionblocks.data import load_dataset
    from diffusionblocks.inference import load

    for preset in ("tiny", "gen-tiny", "lm-tiny"):  # seconds each on a CPU: digits, and Shakespeare for lm-tiny
        train(load_preset(preset), f"runs/{preset}", progress=False)
    clf, gen, lm = (load(f"runs/{p}") for p in ("tiny", "gen-tiny", "lm-tiny"))  # no dataset read
    images = load_dataset("digits").x_test[:8]  # uint8 N x C x H x W; N x H x W x C (as in .npz files) works too
    print(clf.classify(images), clf.probabilities(images).shape)  # class ids (8,), probabilities (8, 10)
    print(gen.sample(4, classes=[0, 1], steps=8).shape)  # uint8 (4, 8, 8, 1)
    print(lm.generate("to be or not", length=32, num=2), lm.score("to be or not to be that is the question " * 3))

Images: uint8 arrays or tensors are read as the data files hold them, N x H x W x C or N x H x W (channels last)
or N x C x H x W (the library's layout, taken first where both match the run's shape), and made float in [-1, 1] by the
task's own `to_float`; float images must already be N x C x H x W in [-1, 1] (the model's input). Text: the run's
saved tokenizer (tokenizer.json) encodes it; `score` gives bits per character, cut into windows of data.seq_len
and scored by the task's own evaluation (masked diffusion: its bound, seeded as `eval` is; autoregressive: exact).
A run of a TensorTask of your own: `sample(num, x=...)` draws y for each row of x (no x when unconditional).
"""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import iterate_eval, to_float
from .run import load_model, load_model_from_shapes
from .tasks import get_task
from .tasks.base import evaluating
from .tasks.imagegen import generate as generate_images
from .tasks.lm import MAX_TEXT_TOKENS, TOKENIZER_FILE, TextData
from .tasks.tensors import TensorDenoiser, TensorTask
from .text import check_length, load_tokenizer

# what each task's run can do, for the error of a method that does not fit it
ABILITIES = {"classify": "classify(images), probabilities(images)", "imagegen": "sample(num, classes, steps, seed)"}
TEXT_ABILITIES = "generate(prompt, length, num, seed, temperature), score(text), evaluate(text)"
TENSOR_ABILITIES = "sample(num, x=..., steps=steps per block, seed)"


class Predictor(nn.Module):
    """A trained run's model with plain inference methods; `model` is the task's own module (in eval mode)."""

    def __init__(self, model: nn.Module, cfg, shapes, tokenizer=None, run: str = ""):
        super().__init__()
        self.model, self.cfg, self.tokenizer, self.run, self.shapes = model, cfg, tokenizer, run, shapes
        # (channels, (height, width)) of an image run's images, from its recorded shapes or its data
        self.image_shape = (shapes.channels, tuple(shapes.image_size)) if hasattr(shapes, "channels") else None
        self.task = cfg.task
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _needs(self, task_kind: str, what: str) -> None:
        """Refuse a method that does not fit the run's task, naming what the run can do."""
        text, tensors = self.tokenizer is not None, isinstance(self.model, TensorDenoiser)
        fits = text if task_kind == "text" else tensors if task_kind == "tensors" else self.task == task_kind
        if not fits:
            can = TEXT_ABILITIES if text else TENSOR_ABILITIES if tensors else ABILITIES.get(self.task, "nothing here")
            raise ValueError(f"{what}: {self.run or 'this run'} is a run of task {self.task} "
                             f"({self.cfg.train.method}); it can {can}")

    # -- image classification -----------------------------------------------------------------------------------

    def images(self, images) -> torch.Tensor:
        """`images` as the model's float input (N, C, H, W) in [-1, 1] (the module docstring's convention)."""
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        c, (h, w) = self.image_shape
        if x.dtype == torch.uint8:
            if x.ndim == 3:  # N x H x W: one channel
                x = x[:, None]
            if x.ndim == 4 and tuple(x.shape[1:]) != (c, h, w) and tuple(x.shape[1:]) == (h, w, c):
                x = x.permute(0, 3, 1, 2)  # channels last (the data files' layout) -> N x C x H x W
            x = to_float(x.contiguous())
        elif not x.is_floating_point():
            raise ValueError(f"images of dtype {x.dtype}: expected uint8 (0..255) or float in [-1, 1]")
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ValueError(f"images of shape {tuple(x.shape)}: this run's model takes {c}x{h}x{w} images (uint8 "
                             f"N x {h} x {w} x {c} or N x {c} x {h} x {w}; float N x {c} x {h} x {w} in [-1, 1])")
        return x.float()

    def _chunks(self, images, batch_size: int | None):
        x = self.images(images)
        labels = torch.zeros(len(x), dtype=torch.long)  # iterate_eval's pairing; never read
        return iterate_eval(x, labels, batch_size or self.cfg.train.eval_batch_size)

    def _generator(self, seed: int | None) -> torch.Generator:
        """`eval`'s generator (train.seed + 999) unless a seed is given: the same draws as `eval` on the same
        images in the same order, batched as eval is (train.eval_batch_size)."""
        return torch.Generator().manual_seed(self.cfg.train.seed + 999 if seed is None else seed)

    @torch.no_grad()
    def classify(self, images, *, seed: int | None = None, batch_size: int | None = None, **options) -> torch.Tensor:
        """Class ids (N,) int64 of `images`. `options`: a DiffusionBlocks run's inference settings
        (steps_per_block, grid, bridge, sigma_start, init; default the run's)."""
        self._needs("classify", "classify")
        gen, out = self._generator(seed), []
        with evaluating(self.model):
            for xb, _ in self._chunks(images, batch_size):
                out.append(self.model.predict(xb.to(self.device), generator=gen, **options)[-1].cpu())
        return torch.cat(out)

    @torch.no_grad()
    def probabilities(self, images, *, seed: int | None = None, batch_size: int | None = None,
                      **options) -> torch.Tensor:
        """Class probabilities (N, classes) float32: the softmax of the model's last logits (DiffusionBlocks: of
        the chain's last step)."""
        self._needs("classify", "probabilities")
        if not hasattr(self.model, "step_logits"):
            raise ValueError(f"probabilities: a {self.cfg.train.method} classifier gives class ids only; use "
                             "classify(images)")
        gen, out = self._generator(seed), []
        with evaluating(self.model):
            for xb, _ in self._chunks(images, batch_size):
                logits = self.model.step_logits(xb.to(self.device), generator=gen, **options)[-1]
                out.append(logits.float().softmax(-1).cpu())
        return torch.cat(out)

    # -- image generation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, num: int, classes=None, steps: int | None = None, seed: int = 0, **ode) -> torch.Tensor:
        """`num` images as uint8 (N, H, W, C), the data files' layout. classes: None (drawn uniformly) or a list
        cycled over the samples; steps and `ode` (sampler, grid, cfg_scale): the run's gen settings by default.
        A TensorTask run: `num` samples of y, conditioned on x=(num, ...) when the model is; steps per block."""
        if isinstance(self.model, TensorDenoiser):
            return self.sample_tensors(num, ode.pop("x", None), steps or TensorTask.sample_steps, seed, **ode)
        self._needs("imagegen", "sample")
        settings = {k: ode.pop(k, getattr(self.cfg.gen, k)) for k in ("sampler", "grid", "cfg_scale")}
        if ode:
            raise ValueError(f"sample: unknown option(s) {', '.join(ode)}; expected sampler, grid, cfg_scale")
        images, _, _ = generate_images(self.model, num, seed=seed, classes=classes, uint8=True,
                                       steps=steps or self.cfg.gen.steps, device=self.device, **settings)
        return images.permute(0, 2, 3, 1).contiguous()

    @torch.no_grad()
    def sample_tensors(self, num: int, x=None, steps_per_block: int = TensorTask.sample_steps, seed: int = 0,
                       **unknown) -> torch.Tensor:
        """A TensorTask run's samples of y (num, ...), each conditioned on its row of x when the model is."""
        self._needs("tensors", "sample")
        if unknown:
            raise ValueError(f"sample: unknown option(s) {', '.join(unknown)} for a {self.task} run (x, steps, seed)")
        target, cond = tuple(self.shapes.target), self.shapes.cond
        if (x is None) != (cond is None):
            what = f"conditioned on x of shape {list(cond)}: give x" if cond else "unconditional: it takes no x"
            raise ValueError(f"sample: this {self.task} model is {what}")
        if x is not None:
            x = torch.as_tensor(x, dtype=torch.float32)
            if tuple(x.shape) != (num, *cond):
                raise ValueError(f"sample: x of shape {tuple(x.shape)}; expected ({num}, {', '.join(map(str, cond))})")
            x = x.to(self.device)
        noise = torch.randn((num, *target), generator=torch.Generator().manual_seed(seed)).to(self.device)
        return self.model.sample(noise, x, steps_per_block).cpu()

    # -- language models ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt: str = "", length: int | None = None, num: int = 1, seed: int = 0,
                 temperature: float | None = None, **options) -> list[str]:
        """`num` texts of `length` tokens (the prompt's included; default data.seq_len), each starting with the
        prompt (as the tokenizer normalizes it). temperature: autoregressive runs only (default theirs)."""
        self._needs("text", "generate")
        length = length or self.cfg.data.seq_len
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"num={num!r}: expected an integer >= 1")
        if num * length > MAX_TEXT_TOKENS:
            raise ValueError(f"num {num} x length {length} over the {MAX_TEXT_TOKENS:,} tokens of one call")
        ids = torch.from_numpy(self.tokenizer.encode_seen(prompt, "the prompt").astype(np.int64))
        if length <= len(ids):
            raise ValueError(f"length={length}: must exceed the prompt's {len(ids)} tokens")
        if temperature is not None:
            options["temperature"] = temperature
        params = inspect.signature(self.model.sample).parameters
        takes = set(params) - {"num", "length", "prompt", "generator", "device", "record"}
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())  # passes options on
        unknown = [] if open_ended else sorted(set(options) - takes)
        if unknown:  # e.g. a temperature for masked diffusion, which draws every step at temperature 1
            raise ValueError(f"generate: {', '.join(unknown)}: not an option of a {type(self.model).__name__}'s "
                             f"sampler (it takes {', '.join(sorted(takes)) or 'none'})")
        tokens = self.model.sample(num, length, ids, generator=torch.Generator().manual_seed(seed),
                                   device=self.device, **options)
        return [self.tokenizer.decode(row.cpu().numpy()) for row in tokens]

    def text_data(self, text: str) -> TextData:
        """`text` as the test split of a TextData (what the task's evaluation reads)."""
        ids = self.tokenizer.encode_seen(text, "the text")
        check_length(len(ids), self.cfg.data.seq_len, "the text")
        chars = self.tokenizer.count_chars(text)
        return TextData("text", self.tokenizer, {"test": ids}, {"test": chars}, self.cfg.data.seq_len)

    @torch.no_grad()
    def evaluate(self, text: str, **options) -> dict:
        """The task's own evaluation of `text` (all its windows of data.seq_len, the last padded; seeded as `eval`
        is): bpc and bpt where the model has a likelihood, next-token accuracy etc. for autoregressive runs."""
        self._needs("text", "evaluate")
        cfg = copy.deepcopy(self.cfg)
        cfg.data.test_limit = 0  # every window of the given text
        return get_task(cfg.task).evaluate(self.model, self.text_data(text), cfg, split="test", device=self.device,
                                           **options)

    def score(self, text: str, **options) -> float:
        """Bits per character of `text` (masked diffusion: the bound, an upper bound; autoregressive: exact)."""
        self._needs("text", "score")
        ev = self.evaluate(text, **options)
        if "bpc" not in ev:
            raise ValueError(f"score: a {self.cfg.train.method} {self.task} model has no likelihood to give bits per "
                             f"character; evaluate(text) gives its next-token accuracy and chain cross-entropy")
        return ev["bpc"]

    def forward(self, *args, **kwargs):
        """The run's model's own forward."""
        return self.model(*args, **kwargs)


def load(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Predictor:
    """A trained run as a Predictor on `device`: its EMA weights when it kept one, in eval mode, built from the
    shapes it recorded (no data read; a run from before they were recorded reads its data for them)."""
    run = Path(run_dir)
    # an older run without shapes.json: its data gives the shapes (and is checked against its fingerprints)
    cfg, model, shapes = load_model_from_shapes(run) or load_model(run)
    if (run / TOKENIZER_FILE).exists():
        tokenizer = load_tokenizer(run / TOKENIZER_FILE)
    else:  # a language run from before tokenizers were saved: the one its data built
        tokenizer = getattr(shapes, "tokenizer", None)
    return Predictor(model.to(device), cfg, shapes, tokenizer, str(run))


__all__ = ["Predictor", "load"]
