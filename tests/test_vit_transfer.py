"""Attention copy and distillation through the run's networks (at_jax.networks,
at_jax.attention_copy, at_jax.evaluate): what the student is given, what gets a gradient, the
shared drop-path masks, the pairing checks and an evaluation that runs both networks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax import evaluate, objective
from at_jax.attention_copy import (
    NO_COPY,
    VIT_PAIRS,
    AttentionCopy,
    attention_distances,
    attention_kl,
)
from at_jax.data.spec import DataSpec
from at_jax.models import forward, get_model
from at_jax.models.vit import shared_drop_masks
from at_jax.networks import Networks

SPEC = DataSpec(4, (16, 16, 1), (0.5,), (0.25,))
TINY = {"embed_dim": 16, "depth": 3, "num_heads": 2}  # /4 on 16×16: 16 patches + class


def vit(**kw):
    return get_model("vit-tiny/4", num_classes=4, **{**TINY, **kw})


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(3, 16, 16, 1)), jnp.float32)
    return images, jnp.asarray([0, 1, 3])


def networks(copy=NO_COPY, terms=None, student=None, teacher=None, seed=1):
    teacher = teacher or vit()
    t_vars = jax.jit(teacher.init)(jax.random.key(seed), jnp.zeros((1, 16, 16, 1)))
    net = Networks(
        model=student or vit(),
        spec=SPEC,
        terms=objective.validate_terms(terms or {"ce": {"weight": 1.0}}),
        teacher_model=teacher,
        teacher_variables=t_vars,
        copy=copy,
    )
    variables, term_params = jax.jit(net.init)(jax.random.key(0), jax.random.key(1))
    return net, {"student": variables["params"], "terms": term_params}, t_vars


@pytest.mark.parametrize("target", ["attention", "k"])
def test_copy_gives_the_student_the_teachers_blocks_and_no_gradient_reaches_its_own(batch, target):
    """The copied blocks' own queries and keys (attention) or keys (k) are unused: their
    weights get a zero gradient, the copy's outputs equal a forward given the teacher's arrays,
    and the last (not copied) block keeps its own."""
    copy = AttentionCopy(target, end_layer=-1)
    net, params, t_vars = networks(copy)
    # each computation one compiled program (op by op, every operation would compile alone)
    logits = jax.jit(
        lambda p: net.outputs(p, {}, t_vars, batch, jax.random.key(2))[0].student_logits
    )
    _, t_acts, _ = jax.jit(lambda v: forward(net.teacher_model, v, batch[0]))(t_vars)
    key = "attention_logits" if target == "attention" else target
    given = [t_acts[f"block{i}.{key}"] for i in range(2)]
    if target == "attention":
        given = [jax.nn.softmax(g, -1) for g in given]

    @jax.jit
    def student(p, given):
        return forward(net.model, {"params": p}, batch[0], given=given, given_kind=target)[0]

    expected = student(params["student"], given)
    np.testing.assert_allclose(logits(params), expected, atol=1e-6)
    own = student(params["student"], None)
    assert not np.allclose(own, expected, atol=1e-4)

    def loss(p):
        o, _ = net.outputs(p, {}, t_vars, batch, jax.random.key(2))
        return objective.make_objective(net.terms)(o)[0]

    grads = jax.jit(jax.grad(loss))(params)["student"]
    unused = slice(16, 32) if target == "k" else slice(0, 32)  # qkv's outputs: q | k | v
    for i in range(3):
        kernel = grads[f"blocks_{i}"]["attn"]["qkv"]["kernel"][:, unused]
        assert (float(jnp.abs(kernel).max()) == 0.0) == (i < 2), i
    assert float(jnp.abs(grads["head"]["kernel"]).max()) > 0


def test_two_vits_of_one_depth_share_drop_path_masks(batch):
    """The teacher runs with the student's masks in training (the port's DualVisionTransformer);
    without drop path, or for ViTs of other depths, none are shared."""
    student = vit(drop_path_rate=0.5)
    masks = shared_drop_masks(student, vit(), jax.random.key(3), 3)
    assert masks.shape == (3, 2, 3)
    np.testing.assert_array_equal(masks[0], 1.0)  # block 0's rate is 0
    assert set(np.unique(masks[2]).tolist()) <= {0.0, 2.0}
    assert shared_drop_masks(vit(), vit(), jax.random.key(3), 3) is None
    assert shared_drop_masks(student, vit(depth=2), jax.random.key(3), 3) is None
    net, params, t_vars = networks(
        AttentionCopy(), {"atd": {"weight": 1.0, "end_layer": 0}}, student=student
    )
    key = jax.random.key(5)
    out, _ = net.outputs(params, {}, t_vars, batch, key)
    masks = shared_drop_masks(student, net.teacher_model, jax.random.fold_in(key, 1), 3)
    _, t_masked, _ = forward(net.teacher_model, t_vars, batch[0], drop_masks=masks)
    _, t_plain, _ = forward(net.teacher_model, t_vars, batch[0])
    np.testing.assert_allclose(out.teacher_acts["block2.tokens"], t_masked["block2.tokens"])
    assert not np.allclose(out.teacher_acts["block2.tokens"], t_plain["block2.tokens"])


def test_copy_refuses_what_cannot_be_paired_in_one_line():
    with pytest.raises(
        ValueError, match=r"needs a ViT student and a ViT teacher \(.*\); the teacher is not"
    ):
        networks(AttentionCopy("attention"), teacher=get_model("wrn-tiny", num_classes=4))
    with pytest.raises(ValueError, match=r"block0.attention_logits has shape \(2, 4, 17, 17\)"):
        networks(AttentionCopy("attention", 0), teacher=vit(num_heads=4))
    with pytest.raises(ValueError, match="and head width"):
        networks(AttentionCopy("q", 0), teacher=vit(embed_dim=32))
    with pytest.raises(ValueError, match="at least 2 blocks; it has 1"):
        networks(AttentionCopy("attention", -1), student=vit(depth=1))
    with pytest.raises(ValueError, match="copies no block of a 3-block teacher"):
        networks(AttentionCopy("attention", -3))
    with pytest.raises(ValueError, match="uses a teacher"):
        Networks(
            model=vit(),
            spec=SPEC,
            terms=objective.validate_terms({"ce": {"weight": 1}}),
            copy=AttentionCopy("v"),
        )
    with pytest.raises(ValueError, match="target must be one of"):
        AttentionCopy("attn")
    with pytest.raises(ValueError, match="end_layer must be <= 0"):
        AttentionCopy("q", 2)
    # a wider (other head width) teacher still pairs for attention: heads and tokens agree
    networks(AttentionCopy("attention", 0), teacher=vit(embed_dim=32))


def test_evaluation_runs_the_copied_student_with_its_teacher(batch):
    """The eval function gives the student the teacher's attention as in training, and
    measures the two ViTs' attention KL block by block (0 against itself)."""
    net, params, t_vars = networks(AttentionCopy("attention", 0))
    assert net.attention_pairs() == VIT_PAIRS
    images = np.asarray(jnp.clip(batch[0] * 0.25 + 0.5, 0, 1) * 255, np.uint8)
    eval_batch = {"image": images, "label": np.asarray(batch[1]), "mask": np.ones(3, bool)}
    fn = evaluate.make_eval_fn(
        net.model,
        SPEC.mean,
        SPEC.std,
        teacher_model=net.teacher_model,
        pairs=VIT_PAIRS,
        copy=net.copy,
    )
    result = evaluate.evaluate(fn, {"params": params["student"]}, [eval_batch], t_vars)
    x = (images.astype(np.float32) / 255 - 0.5) / 0.25
    _, t_acts, _ = forward(net.teacher_model, t_vars, x)
    given = [jax.nn.softmax(t_acts[f"block{i}.attention_logits"], -1) for i in range(3)]
    logits, s_acts, _ = forward(net.model, {"params": params["student"]}, x, given=given)
    wrong = np.mean(np.argmax(logits, -1) != np.asarray(batch[1])) * 100
    assert result["error"] == pytest.approx(wrong)
    kl = np.mean([np.mean(d) for d in attention_distances(s_acts, t_acts).values()])
    # (a KL near zero: float32 round-off of its terms is relative to their size, not to it)
    assert result["attention/mean"] == pytest.approx(kl, rel=1e-4)
    assert len([k for k in result if k.startswith("attention/block")]) == 3
    same = attention_kl(t_acts["block0.attention_logits"], t_acts["block0.attention_logits"])
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    p = jax.nn.softmax(t_acts["block1.attention_logits"], -1)
    q = jax.nn.softmax(s_acts["block1.attention_logits"], -1)
    by_hand = np.mean(np.sum(p * (np.log(p) - np.log(q)), -1), axis=(1, 2))
    np.testing.assert_allclose(
        attention_kl(s_acts["block1.attention_logits"], t_acts["block1.attention_logits"]),
        by_hand,
        rtol=1e-4,
        atol=1e-7,
    )


def vit_run_config(idx_dir, method, **overrides):
    """configs/vit_attention.py's Fashion-MNIST recipe, shrunk for the tiny 16×16 IDX set."""
    from at_jax import recipes
    from configs import vit_attention

    config = vit_attention.get_config(f"{method},fashion_mnist")
    config.model = "vit-tiny/4"
    config.model_overrides.update(TINY)
    config.data.data_dir, config.data.source = str(idx_dir), "local"
    config.batch_size, config.eval_batch_size = 32, 64
    config.num_epochs = config.optimizer.cosine_epochs = 1
    config.optimizer.warmup_epochs = 0
    config.compilation_cache_dir = ""
    for key, value in overrides.items():
        recipes.set_path(config, key, value)
    return config


@pytest.mark.heavy
def test_the_vit_recipe_trains_copy_and_distill_students_end_to_end(idx_dir, tmp_path):
    """configs/vit_attention.py's methods through train_and_evaluate: a ViT teacher, then a
    copied student (two seeds, mixup/CutMix, random erasing, EMA) and a distilled one; the
    results name the copy, the attention KL per block and the EMA's error."""
    from at_jax import convert, train
    from at_jax.checkpoints import restore_variables
    from at_jax.recipes import validate_config

    with pytest.raises(ValueError, match="attention_copy.target='attention' copies a teacher"):
        validate_config(vit_run_config(idx_dir, "copy", **{"teacher.workdir": ""}))
    with pytest.raises(ValueError, match="warmup_epochs must be a number in"):
        validate_config(vit_run_config(idx_dir, "scratch", **{"optimizer.warmup_epochs": 1}))
    teacher = str(tmp_path / "teacher")
    done = train.train_and_evaluate(vit_run_config(idx_dir, "teacher"), teacher, progress=False)
    assert done["model"] == "vit-tiny/4" and "final_ema_test_error" in done
    copy = vit_run_config(
        idx_dir,
        "copy",
        num_seeds=2,
        **{
            "teacher.workdir": teacher,
            "attention_copy.end_layer": -1,
            "data.augment.mixup": 0.8,
            "data.augment.cutmix": 1.0,
            "data.augment.random_erasing": 0.25,
        },
    )
    results = train.train_and_evaluate(copy, str(tmp_path / "copy"), progress=False)
    assert results["attention_copy"] == "attention"
    assert len(results["final_test_error_per_seed"]) == 2
    assert set(results["final_attention_distance"]) == {
        "mean",
        *(f"block{i}.attention<-block{i}.attention" for i in range(3)),
    }
    assert 0 <= results["final_ema_test_error"] <= 100
    # an attention teacher of other classes (as a head-less MAE checkpoint): taken for
    # distillation, its test error not measured
    variables, _, _ = restore_variables(teacher)
    variables["params"]["head"] = {"kernel": jnp.zeros((16, 7)), "bias": jnp.zeros(7)}
    other = str(tmp_path / "seven-classes")
    overrides = {**TINY, "global_pool": True}
    convert.write_run(other, variables, "vit-tiny/4", 7, "imagefolder", 16, {}, overrides)
    distill = vit_run_config(idx_dir, "distill", **{"teacher.workdir": other})
    results = train.train_and_evaluate(distill, str(tmp_path / "distill"), progress=False)
    assert results["loss_terms"] == ["atd", "ce"] and "attention_copy" not in results
    assert results["final_attention_distance"]["mean"] > 0
    assert "teacher_test_error" not in results
    with pytest.raises(ValueError, match="classifies 7 classes; this run has 10"):
        kd = vit_run_config(idx_dir, "scratch", **{"teacher.workdir": other, "loss.kd.weight": 1})
        train.train_and_evaluate(kd, str(tmp_path / "kd"), progress=False)
