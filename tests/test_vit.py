"""ViTs that expose their attention (at_jax.models.vit) and the two attention-distillation losses,
against a PyTorch ViT written here from the conventions of the attention-transfer port
(github.com/alexlioralexli/attention-transfer, models_dual_vit.py: timm/MAE blocks, qkv bias,
LayerNorm eps 1e-6, exact GELU, class token or global pool + fc_norm)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax.losses import at_losses, attention_distillation_loss, qkv_distillation_loss
from at_jax.models import forward, get_model

if os.environ.get("AT_JAX_REQUIRE_TORCH"):
    import torch
else:
    torch = pytest.importorskip("torch")

F = torch.nn.functional
TINY = {"embed_dim": 16, "depth": 2, "num_heads": 2}  # vit-*/7 on 28×28: 16 patches + class


class TorchBlock(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        y = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)))), logits


class TorchViT(torch.nn.Module):
    def __init__(self, patch, dim, depth, heads, classes, global_pool):
        super().__init__()
        self.patch_embed = torch.nn.Conv2d(1, dim, patch, stride=patch)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 17, dim))
        self.blocks = torch.nn.ModuleList([TorchBlock(dim, heads) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)  # fc_norm when global_pool
        self.head = torch.nn.Linear(dim, classes)
        self.global_pool = global_pool

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        logits = []
        for block in self.blocks:
            x, attn = block(x)
            logits.append(attn)
        x = self.norm(x[:, 1:].mean(dim=1)) if self.global_pool else self.norm(x)[:, 0]
        return self.head(x), logits


def load_into_torch(module, params, global_pool):
    """Copy Flax ViT parameters into TorchViT (Dense kernels transposed, conv HWIO -> OIHW)."""
    t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731

    def linear(layer, p):
        layer.weight.data, layer.bias.data = t(p["kernel"]).T.contiguous(), t(p["bias"])

    def norm(layer, p):
        layer.weight.data, layer.bias.data = t(p["scale"]), t(p["bias"])

    module.patch_embed.weight.data = t(params["patch_embed"]["kernel"]).permute(3, 2, 0, 1)
    module.patch_embed.bias.data = t(params["patch_embed"]["bias"])
    module.cls_token.data, module.pos_embed.data = t(params["cls_token"]), t(params["pos_embed"])
    for i, block in enumerate(module.blocks):
        p = params[f"blocks_{i}"]
        norm(block.norm1, p["norm1"]), norm(block.norm2, p["norm2"])
        linear(block.qkv, p["attn"]["qkv"]), linear(block.proj, p["attn"]["proj"])
        linear(block.fc1, p["fc1"]), linear(block.fc2, p["fc2"])
    norm(module.norm, params["fc_norm" if global_pool else "norm"])
    linear(module.head, params["head"])


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(3, 28, 28, 1)).astype(np.float32)


@pytest.mark.parametrize("global_pool", [False, True])
def test_vit_logits_and_attention_equal_a_pytorch_vit(images, global_pool):
    model = get_model("vit-tiny/7", num_classes=5, global_pool=global_pool, **TINY)
    variables = model.init(jax.random.key(0), jnp.asarray(images))
    logits, acts, _ = forward(model, variables, jnp.asarray(images))
    reference = TorchViT(7, 16, 2, 2, 5, global_pool)
    load_into_torch(reference, variables["params"], global_pool)
    with torch.no_grad():
        t_logits, t_attention = reference(torch.tensor(images).permute(0, 3, 1, 2))
    np.testing.assert_allclose(logits, t_logits.numpy(), atol=1e-4, rtol=1e-4)
    for i, attention in enumerate(t_attention):
        np.testing.assert_allclose(acts[f"block{i}.attention_logits"], attention, atol=1e-4)
    # what each block exposes for transfer: logits, q/k/v per head, tokens, the patch grid
    assert acts["block1.q"].shape == (3, 2, 17, 8) and acts["block1.tokens"].shape == (3, 17, 16)
    np.testing.assert_array_equal(acts["block1"].reshape(3, 16, 16), acts["block1.tokens"][:, 1:])


def test_the_patch_grid_is_a_transfer_point_for_the_2017_losses(images):
    """A ViT's block grids pair with a CNN's groups (at_losses), and two ViTs of one depth pair
    their blocks by "groups"."""
    x = jnp.asarray(images)
    vit = get_model("vit-tiny/4", num_classes=5, **TINY)  # a 7×7 patch grid
    _, v_acts, _ = forward(vit, vit.init(jax.random.key(0), x), x)
    wrn = get_model("wrn-tiny", num_classes=5)
    _, w_acts, _ = forward(wrn, wrn.init(jax.random.key(1), x), x)
    total, per_pair = at_losses(v_acts, w_acts, [("block0", "group1"), ("block1", "group2")])
    assert np.isfinite(total) and len(per_pair) == 2  # 7×7 grids against 14×14 and 7×7 maps
    assert float(total) > 0
    same, pairs = at_losses(v_acts, v_acts, "groups")
    assert float(same) == 0.0 and len(pairs) == 2


def test_attention_copy_reproduces_the_teachers_blocks(images):
    """A student with the teacher's weights but other queries and keys reproduces the teacher's
    block outputs when it is given the teacher's attention (its q and k are then unused); given
    the teacher's v, a student with other values reproduces them too."""
    x = jnp.asarray(images)
    model = get_model("vit-tiny/7", num_classes=5, **TINY)
    teacher = model.init(jax.random.key(0), x)
    _, t_acts, _ = forward(model, teacher, x)
    student = jax.tree.map(lambda a: a, teacher)
    for i in range(2):  # other q and k weights: the first two thirds of qkv's outputs
        kernel = student["params"][f"blocks_{i}"]["attn"]["qkv"]["kernel"]
        noise = jax.random.normal(jax.random.key(i + 7), kernel[:, :32].shape)
        student["params"][f"blocks_{i}"]["attn"]["qkv"]["kernel"] = kernel.at[:, :32].add(noise)
    given = [jax.nn.softmax(t_acts[f"block{i}.attention_logits"], -1) for i in range(2)]

    def tokens(variables, **kw):
        out = model.apply(variables, x, mutable=["intermediates"], **kw)[1]["intermediates"]
        return [out[f"block{i}.tokens"][0] for i in range(2)]

    own = tokens(student)
    copied = tokens(student, given=given, given_kind="attention")
    for i in range(2):
        assert not np.allclose(own[i], t_acts[f"block{i}.tokens"], atol=1e-3)
        np.testing.assert_allclose(copied[i], t_acts[f"block{i}.tokens"], atol=1e-5)
    # copy of v: values from the teacher, attention from the student's own q and k (= the
    # teacher's here, as only v's weights are changed)
    other_v = jax.tree.map(lambda a: a, teacher)
    kernel = other_v["params"]["blocks_0"]["attn"]["qkv"]["kernel"]
    other_v["params"]["blocks_0"]["attn"]["qkv"]["kernel"] = kernel.at[:, 32:].multiply(3.0)
    v_copied = tokens(other_v, given=[t_acts["block0.v"]], given_kind="v")
    np.testing.assert_allclose(v_copied[0], t_acts["block0.tokens"], atol=1e-5)
    with pytest.raises(ValueError, match="given_kind must be one of"):
        model.apply(teacher, x, given=given, given_kind="keys")


def test_drop_path_masks_from_outside_and_from_the_rng(images):
    """Zero masks skip a block's two branches (its output is its input); masks of ones are eval
    mode; in training the masks come from the "dropout" stream, per example."""
    x = jnp.asarray(images)
    model = get_model("vit-tiny/7", num_classes=5, drop_path_rate=0.5, **TINY)
    variables = model.init(jax.random.key(0), x)

    def run(**kw):
        out = model.apply(variables, x, mutable=["intermediates"], **kw)
        return out[0], out[1]["intermediates"]

    logits, _ = run()
    ones, _ = run(train=True, drop_masks=jnp.ones((2, 2, 3)))
    np.testing.assert_allclose(ones, logits, atol=1e-6)
    _, skipped = run(train=True, drop_masks=jnp.zeros((2, 2, 3)))
    np.testing.assert_allclose(skipped["block1.tokens"][0], skipped["block0.tokens"][0])
    a, _ = run(train=True, rngs={"dropout": jax.random.key(3)})
    b, _ = run(train=True, rngs={"dropout": jax.random.key(3)})
    c, _ = run(train=True, rngs={"dropout": jax.random.key(4)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, logits)


def test_vit_names_and_image_sizes():
    base = get_model("vit-base/16")
    assert (base.embed_dim, base.depth, base.num_heads, base.patch_size) == (768, 12, 12, 16)
    large = get_model("vit-large/14")
    assert (large.embed_dim, large.depth, large.num_heads) == (1024, 24, 16)
    model = get_model("vit-tiny/16", num_classes=5, **TINY)
    with pytest.raises(ValueError, match="multiples of 16.*28×28"):
        model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    with pytest.raises(ValueError, match="unknown model 'vit-gigantic/14'.*ViT sizes: tiny"):
        get_model("vit-gigantic/14")


def test_attention_distillation_loss_equals_the_ports_and_its_formula():
    rng = np.random.default_rng(1)
    s, t = (rng.normal(size=(2, 3, 5, 5)).astype(np.float32) for _ in range(2))
    ours = attention_distillation_loss(jnp.asarray(s), jnp.asarray(t))
    ts, tt = torch.tensor(s), torch.tensor(t)
    port = -(tt.softmax(dim=-1) * torch.log_softmax(ts, dim=-1)).sum(dim=-1).mean()
    np.testing.assert_allclose(ours, port.item(), rtol=1e-6)
    p = np.exp(t) / np.exp(t).sum(-1, keepdims=True)
    log_q = s - np.log(np.exp(s).sum(-1, keepdims=True))
    np.testing.assert_allclose(ours, -(p * log_q).sum(-1).mean(), rtol=1e-5)
    # its minimum over the student is the teacher's entropy, at the teacher's logits
    entropy = -(p * np.log(p)).sum(-1).mean()
    np.testing.assert_allclose(attention_distillation_loss(t, t), entropy, rtol=1e-5)
    grads = jax.grad(attention_distillation_loss, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
    assert np.abs(grads[0]).sum() > 0 and not np.any(grads[1])  # no gradient to the teacher
    np.testing.assert_allclose(
        qkv_distillation_loss(jnp.asarray(s), jnp.asarray(t)), F.mse_loss(ts, tt).item(), rtol=1e-6
    )
    assert not np.any(jax.grad(qkv_distillation_loss, argnums=1)(jnp.asarray(s), jnp.asarray(t)))
    with pytest.raises(ValueError, match="same shape"):
        attention_distillation_loss(jnp.zeros((2, 3, 5, 5)), jnp.zeros((2, 4, 5, 5)))


def test_the_atd_term_sums_the_distilled_blocks_and_refuses_what_cannot_pair(images):
    """config.loss.atd: blocks 0 .. depth + end_layer − 1 of two ViTs, attention or q/k/v;
    a CNN teacher, a too-shallow student or heads that differ are refused with one line."""
    from at_jax.objective import StepOutputs, make_objective
    from at_jax.vit_losses import attention_distillation_losses

    x = jnp.asarray(images)
    deep = dict(TINY, depth=3)
    teacher = get_model("vit-tiny/7", num_classes=5, **deep)
    _, t_acts, _ = forward(teacher, teacher.init(jax.random.key(0), x), x)
    student = get_model("vit-tiny/7", num_classes=5, **deep)
    s_logits, s_acts, _ = forward(student, student.init(jax.random.key(1), x), x)
    out = StepOutputs(x, jnp.array([0, 1, 2]), s_logits, s_acts, s_logits, t_acts)
    objective = make_objective({"atd": {"weight": 3.0, "end_layer": -1}})
    loss, measured = objective(out)
    name = "block{}.attention_logits".format
    blocks = [attention_distillation_loss(s_acts[name(i)], t_acts[name(i)]) for i in range(2)]
    np.testing.assert_allclose(measured["atd"], sum(blocks), rtol=1e-6)
    np.testing.assert_allclose(loss, 3.0 * sum(blocks), rtol=1e-6)
    total, per_block = attention_distillation_losses(s_acts, t_acts, 0, "v")
    assert sorted(per_block) == ["block0", "block1", "block2"]
    v = [qkv_distillation_loss(s_acts[f"block{i}.v"], t_acts[f"block{i}.v"]) for i in range(3)]
    np.testing.assert_allclose(total, sum(v), rtol=1e-6)
    shallow = get_model("vit-tiny/7", num_classes=5, **TINY)  # 2 blocks
    _, sh_acts, _ = forward(shallow, shallow.init(jax.random.key(2), x), x)
    with pytest.raises(ValueError, match="at least 3 blocks"):
        attention_distillation_losses(sh_acts, t_acts, 0)
    with pytest.raises(ValueError, match="end_layer=-3 distils blocks 0..-1 of a 3-block"):
        attention_distillation_losses(s_acts, t_acts, -3)
    wrn = get_model("wrn-tiny", num_classes=5)
    _, w_acts, _ = forward(wrn, wrn.init(jax.random.key(3), x), x)
    with pytest.raises(ValueError, match="needs a ViT teacher"):
        attention_distillation_losses(s_acts, w_acts)
    heads = get_model("vit-tiny/7", num_classes=5, **dict(deep, num_heads=4))
    _, h_acts, _ = forward(heads, heads.init(jax.random.key(4), x), x)
    with pytest.raises(ValueError, match="block 0 cannot be distilled.*same shape"):
        attention_distillation_losses(h_acts, t_acts, 0)
