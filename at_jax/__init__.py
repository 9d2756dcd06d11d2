"""at_jax: Attention Transfer (Zagoruyko & Komodakis, ICLR 2017) in JAX/Flax.

What to call:

* in your own training code, on your own Linen or NNX models:
  :func:`at_jax.capture.capture` (activations by submodule path),
  :func:`at_jax.losses.at_losses`, :func:`at_jax.losses.kd_kl`, :func:`at_jax.losses.kd_loss`
  (array-level losses), :func:`at_jax.gradient.grad_at_loss` (gradient-based attention),
  :func:`at_jax.runs.load_teacher` (a trained run as a teacher, in one line),
  :func:`at_jax.analysis.attention_distance` and :func:`at_jax.figures.attention_figure`;
* config-driven runs: ``python -m at_jax.main --config configs/FILE.py:METHOD --workdir DIR``
  (:func:`at_jax.train.train_and_evaluate`), with the objective composed of named terms
  (:mod:`at_jax.objective`).

Importing the package itself is light (no JAX): Grain's worker processes import
``at_jax.data.transforms`` and ``at_jax.data.sources`` only.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
