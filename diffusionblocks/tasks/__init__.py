"""Tasks: how a problem (classification, generation, language modelling) is cast as denoising."""
