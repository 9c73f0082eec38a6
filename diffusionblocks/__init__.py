"""DiffusionBlocks: train a residual network block by block as the steps of a reverse diffusion.

The method, read in this order: `noise` (levels, their partition into blocks), `precond` (the EDM
denoiser and per-sample losses), `blocks` (`BlockStack`: layers cut into B denoisers), `sample` (Euler and
Heun over a grid). Training: `train(cfg, out)` runs a task (`tasks/`) with a method (`methods/`);
`load_model(run)` rebuilds a trained model; `inference.load(run)` gives it as a plain module (classify, sample,
generate, score) without reading the data. Your own network and data in the harness: `TensorTask` (tasks/tensors.py),
made nameable by `register` (registry.py: also modules given to `--plugin`, and installed entry points).

Imports go one way (a module imports only from the rows above its own):
    core      noise, precond, blocks, sample, nn, adapters
    parts     models, data, config, io, images, fd, text, memory, measure, residency, registry, version, logs
    plug-ins  tasks/ (base, optional, images, tensors, classify, imagegen, lm, mdlm, arlm, recurrent), methods/ (base,
              e2e, dblocks, ff, cff, greedy, dgl, noprop, dtp): each declares its own config sections and presets,
              registered on import (so importing any module of the package registers them all)
    runs      run (file names, checkpoints, building and loading a run's model, the device)
    loop      train
    harness   jobs, parallel, compare, plan, cli, inference
"""

from . import inference  # noqa: E402
from .blocks import BlockStack, split_layers  # noqa: E402
from .config import RunConfig, load_preset  # noqa: E402
from .inference import Predictor  # noqa: E402
from .methods import METHODS  # noqa: E402
from .noise import LogNormalLevels, MaskLevels, Partition  # noqa: E402
from .precond import ClassEmbedding, EDMPrecond, PlainPrecond, ce_loss, mse_loss  # noqa: E402
from .registry import register  # noqa: E402
from .run import evaluate, load_model  # noqa: E402
from .sample import euler, heun  # noqa: E402
from .tasks import TASKS  # noqa: E402
from .tasks.tensors import TensorTask  # noqa: E402
from .train import train  # noqa: E402
from .version import __version__

__all__ = ["METHODS", "TASKS", "BlockStack", "ClassEmbedding", "EDMPrecond", "LogNormalLevels", "MaskLevels",
           "Partition", "PlainPrecond", "Predictor", "RunConfig", "TensorTask", "__version__", "ce_loss", "euler",
           "evaluate", "heun", "inference", "load_model", "load_preset", "mse_loss", "register", "split_layers",
           "train"]
