"""The distillation baselines as pure JAX array functions, one small module per family, and
(:mod:`at_jax.distill.terms`) as registered objective terms.

* :mod:`at_jax.distill.relational`: SP, CC, RKD, PKT (relations between a batch's examples);
* :mod:`at_jax.distill.features`: FitNet's hint, NST, VID (feature maps, ``channel_axis``);
* :mod:`at_jax.distill.logits`: DKD;
* :mod:`at_jax.distill.stagewise`: AB, FSP, FT (the methods RepDistiller trains in two stages);
* :mod:`at_jax.distill.contrastive`: CRD (embeddings, NCE, its memory bank as state).

As terms (``config.loss.<name>``): :mod:`at_jax.distill.terms` (fitnet, sp, cc, vid, rkd, pkt,
nst, dkd) and :mod:`at_jax.distill.stage_terms` (ab, fsp, ft with their first stage; crd with
its memory in the train state). :data:`REFERENCE_WEIGHTS`: each term's β in RepDistiller's
``scripts/run_cifar_distill.sh`` (DKD: mdistiller's).

Each follows its reference code (RepDistiller at b84f547, ``distiller_zoo/``; mdistiller at
a08d46f for DKD): the teacher's side is under ``stop_gradient``; where the reference and its paper
differ, the docstring says so and the paper's form is an option. The functions do not import the
train step: use them in any training code.
"""

from at_jax.distill import stage_terms as _stage_terms, terms as _terms

REFERENCE_WEIGHTS = {**_terms.REFERENCE_WEIGHTS, **_stage_terms.REFERENCE_WEIGHTS}

__all__ = ["REFERENCE_WEIGHTS"]
