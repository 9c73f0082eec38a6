"""DiffusionBlocks: train a residual network block by block as the steps of a reverse diffusion."""

__version__ = "0.1.0"
