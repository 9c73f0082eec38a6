"""`python -m diffusionblocks` (and `torchrun -m diffusionblocks`) runs the command-line tool."""

from .cli import main

if __name__ == "__main__":
    main()
