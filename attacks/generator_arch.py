"""The DCGAN face generator's architecture (z in R^100 -> 64x64 RGB in [-1, 1]).

The class lives in fl_sim.generator, which loads the `dcgan-faces` checkpoint into it (state
dict keys main.0.weight ... main.12.weight, as in the gan-face-generate package); it is
re-exported here so attacks and their tests can build a randomly initialised one without
the asset.
"""
from fl_sim.generator import LATENT_DIM, DCGANGenerator

__all__ = ["DCGANGenerator", "LATENT_DIM"]
