"""MAE's fine-tuning recipe (at_jax.optim, at_jax.mixing, the ce term's label smoothing), piece
by piece against the attention-transfer port's formulas (util/lr_decay.py, util/lr_sched.py,
util/model_ema.py) and PyTorch's AdamW / cross-entropy; timm's Mixup and RandomErasing by their
defining properties."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from test_vit import torch

from at_jax import objective, optim
from at_jax.mixing import mix_batch, random_erasing, regularize, smooth_targets
from at_jax.models import get_model

DEPTH = 3


@pytest.fixture(scope="module")
def params():
    model = get_model("vit-tiny/4", num_classes=3, embed_dim=8, depth=DEPTH, num_heads=2)
    student = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    return {"student": student, "terms": {"factt": {"kernel": jnp.ones((2, 2))}}}


def timm_name(path):
    """Our parameter path as the port's named_parameters() name (DualVisionTransformer)."""
    keys = [str(k.key) for k in path]
    if keys[0] == "terms":
        return "terms." + ".".join(keys[1:])
    name = ".".join(keys[1:]).replace("blocks_", "blocks.")
    return "student." + name.replace(".fc1", ".mlp.fc1").replace(".fc2", ".mlp.fc2")


def port_layer_id(name, num_layers):  # util/lr_decay.py's get_layer_id_for_vit
    if "cls_token" in name or "pos_embed" in name or "patch_embed" in name:
        return 0
    if "blocks" in name:
        return int(name.split(".")[2]) + 1
    return num_layers


@pytest.mark.parametrize("form, num_layers", [("port", DEPTH), ("mae", DEPTH + 1)])
def test_layer_decay_factors_per_parameter(params, form, num_layers):
    ids, top = optim.layer_ids(params, form)
    assert top == num_layers
    flat = jax.tree_util.tree_flatten_with_path(ids)[0]
    for path, layer in flat:
        assert layer == port_layer_id(timm_name(path), num_layers), timm_name(path)
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optim.layer_decay(0.5, form)
    scaled, _ = tx.update(grads, tx.init(params), params)
    assert float(scaled["student"]["pos_embed"].max()) == 0.5**num_layers
    assert float(scaled["student"]["blocks_1"]["fc1"]["kernel"].max()) == 0.5 ** (num_layers - 2)
    assert float(scaled["student"]["head"]["kernel"].max()) == 1.0
    with pytest.raises(ValueError, match="needs a ViT student"):
        optim.layer_ids({"student": {"conv": {"kernel": jnp.ones(3)}}})


def test_the_weight_decay_mask(params):
    mask = optim.weight_decay_mask(params)
    s = mask["student"]
    assert s["patch_embed"]["kernel"] and s["blocks_0"]["attn"]["qkv"]["kernel"]
    assert s["head"]["kernel"] and mask["terms"]["factt"]["kernel"]
    assert not any(
        [
            s["pos_embed"],
            s["cls_token"],
            s["patch_embed"]["bias"],
            s["blocks_0"]["norm1"]["scale"],
            s["blocks_2"]["fc2"]["bias"],
            s["norm"]["bias"],
        ]
    )


def port_lr(epoch, lr, min_lr, warmup, epochs):  # util/lr_sched.py's adjust_learning_rate
    if epoch < warmup:
        return lr * epoch / warmup
    cosine = math.cos(math.pi * (epoch - warmup) / (epochs - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1 + cosine)


def mae_optimizer(**kw):
    values = {
        "name": "adamw",
        "lr": 1e-3,
        "lr_batch_size": 256,
        "b1": 0.9,
        "b2": 0.95,
        "weight_decay": 0.05,
        "schedule": "warmup_cosine",
        "warmup_epochs": 2,
        "min_lr": 1e-6,
        "cosine_epochs": 10,
        "layer_decay": 0.75,
        "layer_decay_form": "port",
        "clip_grad_norm": 0.0,
        "ema_decay": 0.0,
    }
    return ml_collections.ConfigDict({**values, **kw})


def test_the_schedule_at_chosen_steps():
    opt = mae_optimizer()
    schedule = optim.lr_schedule(opt, 512, steps_per_epoch=7)  # lr = 1e-3 · 512/256
    for step in (0, 1, 6, 7, 13, 14, 15, 40, 69):
        expected = port_lr(step / 7, 2e-3, 1e-6, 2, 10)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12), step
    assert float(schedule(70)) == pytest.approx(1e-6)


def test_adamw_with_layer_decay_and_the_mask_is_pytorchs(params):
    """Five steps of our optimiser against torch.optim.AdamW with the port's param groups
    (lr_scale, weight_decay per group) and its per-step lr."""
    opt, steps_per_epoch, batch = mae_optimizer(), 2, 256
    tx = optim.build_optimizer(opt, batch, steps_per_epoch)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    torch_params = [torch.tensor(np.asarray(v), requires_grad=True) for _, v in flat]
    groups = []
    for (path, value), tp in zip(flat, torch_params, strict=True):
        name = timm_name(path)
        no_decay = value.ndim == 1 or name.split(".")[-1] in ("pos_embed", "cls_token")
        groups.append(
            {
                "params": [tp],
                "weight_decay": 0.0 if no_decay else 0.05,
                "lr_scale": 0.75 ** (DEPTH - port_layer_id(name, DEPTH)),
            }
        )
    torch_opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    state, current = tx.init(params), params
    rng = np.random.default_rng(0)
    for step in range(5):
        grads = [rng.normal(size=np.shape(v)).astype(np.float32) for _, v in flat]
        updates, state = tx.update(jax.tree.unflatten(treedef, grads), state, current)
        current = optax.apply_updates(current, updates)
        lr = port_lr(step / steps_per_epoch, 1e-3, 1e-6, 2, 10)
        for group, tp, g in zip(torch_opt.param_groups, torch_params, grads, strict=True):
            group["lr"] = lr * group["lr_scale"]
            tp.grad = torch.tensor(g)
        torch_opt.step()
    for (path, value), tp in zip(
        jax.tree_util.tree_flatten_with_path(current)[0], torch_params, strict=True
    ):
        np.testing.assert_allclose(value, tp.detach().numpy(), atol=1e-6, err_msg=timm_name(path))


def test_the_ema_after_k_steps_and_where_it_is_kept(params):
    opt = mae_optimizer(ema_decay=0.9, layer_decay=1.0)
    tx = optim.build_optimizer(opt, 256, 4, frozen={("head", "kernel")})
    state, current = tx.init(params), params
    expected = params
    for k in range(4):
        grads = jax.tree.map(lambda p, k=k: jnp.full_like(p, 0.1 * (k + 1)), params)
        updates, state = tx.update(grads, state, current)
        current = optax.apply_updates(current, updates)
        expected = jax.tree.map(lambda e, c: 0.9 * e + 0.1 * c, expected, current)
    ema = optim.ema_params(state)
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        ema["student"]["head"]["kernel"],  # frozen: unchanged
        params["student"]["head"]["kernel"],
        rtol=1e-6,
    )
    assert not np.allclose(ema["student"]["norm"]["bias"], params["student"]["norm"]["bias"])
    assert optim.ema_params(optim.build_optimizer(mae_optimizer(), 256, 4).init(params)) is None


def test_label_smoothing_is_pytorchs():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 5)), jnp.float32)
    labels = jnp.asarray([0, 3, 4, 1])
    out = objective.StepOutputs(images=None, labels=labels, student_logits=logits, student_acts={})
    ours = objective.ce_term(out, label_smoothing=0.1)
    theirs = torch.nn.functional.cross_entropy(
        torch.tensor(np.asarray(logits)),
        torch.tensor(np.asarray(labels, np.int64)),
        label_smoothing=0.1,
    )
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    np.testing.assert_allclose(smooth_targets(labels, 5, 0.1)[1], [0.02, 0.02, 0.02, 0.92, 0.02])
    # a mixed batch's soft targets, then smoothed: the same as smoothing first (timm's order)
    soft = 0.7 * jax.nn.one_hot(labels, 5) + 0.3 * jax.nn.one_hot(labels[::-1], 5)
    mixed = objective.ce_term(
        objective.StepOutputs(
            images=None, labels=labels, student_logits=logits, student_acts={}, targets=soft
        ),
        label_smoothing=0.1,
    )
    first = 0.7 * smooth_targets(labels, 5, 0.1) + 0.3 * smooth_targets(labels[::-1], 5, 0.1)
    by_hand = -jnp.mean(jnp.sum(first * jax.nn.log_softmax(logits), -1))
    assert float(mixed) == pytest.approx(float(by_hand), rel=1e-6)


def test_mixup_and_cutmix_mix_images_and_labels_as_timm():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 12, 12, 2)), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 3, 4, 0])
    y = jax.nn.one_hot(labels, 5)
    kinds = []
    for seed in range(40):
        out, targets, lam = mix_batch(
            jax.random.key(seed), x, labels, 5, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5
        )
        np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], atol=1e-6)
        from_flipped = np.isclose(out, x[::-1]) & ~np.isclose(x, x[::-1])
        blended = np.allclose(out, lam * x + (1 - lam) * x[::-1], atol=1e-5)
        if blended and not from_flipped.all():
            kinds.append("mixup")
        else:  # cutmix: each pixel the image's own or the flipped one's, λ = 1 − box area
            assert np.all(np.isclose(out, x) | np.isclose(out, x[::-1]))
            assert float(lam) == pytest.approx(1 - from_flipped[0, :, :, 0].mean(), abs=1e-6)
            kinds.append("cutmix")
    assert 10 < kinds.count("cutmix") < 30  # switch_prob 0.5
    out, targets, lam = mix_batch(jax.random.key(0), x, labels, 5, mixup_alpha=0.8, prob=0.0)
    np.testing.assert_array_equal(out, x)
    assert float(lam) == 1.0
    np.testing.assert_allclose(targets, y)


def test_random_erasing_fills_one_box_per_image_with_noise():
    x = jnp.full((16, 16, 16, 3), 7.0)
    out = np.asarray(random_erasing(jax.random.key(0), x, 1.0))
    for image in out:
        erased = image[:, :, 0] != 7.0
        rows, cols = np.where(erased)
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert erased.sum() == h * w and 0.02 * 256 * 0.5 <= h * w <= 256 / 3 * 1.5
        assert np.all((image != 7.0) == erased[:, :, None])  # every channel
    np.testing.assert_array_equal(random_erasing(jax.random.key(0), x, 0.0), x)
    some = np.asarray(random_erasing(jax.random.key(1), x, 0.25))
    assert 0 < np.mean([np.any(i != 7.0) for i in some]) < 1
    images, targets = regularize(jax.random.key(0), x, jnp.zeros(16, int), 3, {})
    assert targets is None and images is x
