"""at_jax: Attention Transfer (Zagoruyko & Komodakis, ICLR 2017) in JAX/Flax."""

from at_jax import gradient, losses  # noqa: F401  (registers every loss term)

__version__ = "0.1.0"
