"""at_jax: Attention Transfer (Zagoruyko & Komodakis, ICLR 2017) in JAX/Flax.

Importing the package itself is light (no JAX): Grain's worker processes import
``at_jax.data.transforms`` and ``at_jax.data.sources`` only. ``at_jax.losses`` registers every
loss term, the input-gradient ones of ``at_jax.gradient`` included.
"""

__version__ = "0.1.0"
