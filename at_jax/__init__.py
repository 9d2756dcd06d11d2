"""at_jax: Attention Transfer (Zagoruyko & Komodakis, ICLR 2017) in JAX/Flax."""

__version__ = "0.1.0"
