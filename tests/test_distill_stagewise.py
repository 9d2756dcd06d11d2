"""AB, FSP, FT (at_jax.distill.stagewise) and CRD (at_jax.distill.contrastive) against PyTorch
references written here from RepDistiller (b84f547: distiller_zoo/AB.py, FSP.py, FT.py,
models/util.py, crd/criterion.py, crd/memory.py, dataset/cifar100.py): values and gradients,
float32, channels first on the PyTorch side."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_distill import RTOL, check, nchw, rand
from test_fidelity import torch

from at_jax.distill import contrastive, stagewise

F = torch.nn.functional


def torch_ab(g_s, g_t, margin=1.0):  # distiller_zoo/AB.py
    n, bsz = len(g_s), g_s[0].shape[0]
    total = 0
    for i, (s, t) in enumerate(zip(g_s, g_t, strict=True)):
        loss = (s + margin) ** 2 * ((s > -margin) & (t <= 0)).float() + (s - margin) ** 2 * (
            (s <= margin) & (t > 0)
        ).float()
        total = total + 2 ** (i - n + 1) * torch.abs(loss).sum() / bsz / 1000 * 3
    return total


def torch_fsp(g):  # distiller_zoo/FSP.py: compute_fsp
    out = []
    for bot, top in itertools.pairwise(g):
        b_h, t_h = bot.shape[2], top.shape[2]
        if b_h > t_h:
            bot = F.adaptive_avg_pool2d(bot, (t_h, t_h))
        elif b_h < t_h:
            top = F.adaptive_avg_pool2d(top, (b_h, b_h))
        bot, top = bot.unsqueeze(1), top.unsqueeze(2)
        bot = bot.view(bot.shape[0], bot.shape[1], bot.shape[2], -1)
        top = top.view(top.shape[0], top.shape[1], top.shape[2], -1)
        out.append((bot * top).mean(-1))
    return out


def torch_factor_loss(f_s, f_t, p1=2):  # distiller_zoo/FT.py
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))

    def factor(f):
        return F.normalize(f.pow(p1).mean(1).view(f.size(0), -1))

    return (factor(f_s) - factor(f_t)).abs().mean()


def test_ab_loss_is_the_references_with_its_layer_weights_and_constants():
    assert stagewise.ab_layer_weights(3) == [0.25, 0.5, 1.0]
    shapes = [(3, 8, 8, 2), (3, 4, 4, 4)]
    s = [rand(*sh, seed=i) for i, sh in enumerate(shapes)]
    t = [rand(*sh, seed=10 + i) for i, sh in enumerate(shapes)]

    def ours(a, b):
        return stagewise.ab_loss([a, jnp.asarray(s[1])], [b, jnp.asarray(t[1])])

    def ref(a, b):
        return torch_ab([a, nchw(s[1])], [b, nchw(t[1]).detach()])

    check(ours, ref, s[0], t[0])
    with pytest.raises(ValueError, match="connect the student's with Connector"):
        stagewise.ab_loss([jnp.zeros((2, 4, 4, 3))], [jnp.zeros((2, 4, 4, 5))])
    # a connector: the identity when channels and size agree, else conv + batch norm, no ReLU
    same = stagewise.Connector(2, (8, 8), (8, 8))
    assert same.init(jax.random.key(0), jnp.asarray(s[0])) == {}
    conv = stagewise.Connector(5, (8, 8), (4, 4))
    variables = conv.init(jax.random.key(0), jnp.asarray(s[0]))
    out = conv.apply(variables, jnp.asarray(s[0]))
    assert out.shape == (3, 4, 4, 5) and float(jnp.min(out)) < 0  # no ReLU


def test_fsp_matrices_and_loss_are_the_references():
    maps_s = [rand(2, 8, 8, 3, seed=i) for i in range(1)] + [rand(2, 4, 4, 5, seed=1)]
    maps_s.append(rand(2, 4, 4, 6, seed=2))
    maps_t = [rand(*m.shape, seed=20 + i) for i, m in enumerate(maps_s)]
    ours = stagewise.fsp_matrices([jnp.asarray(m) for m in maps_s])
    refs = torch_fsp([nchw(m) for m in maps_s])
    for a, b in zip(ours, refs, strict=True):
        assert a.shape == tuple(b.shape)
        np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), rtol=1e-5, atol=1e-6)

    def fsp_ours(a, b):
        rest_s, rest_t = [jnp.asarray(m) for m in maps_s[1:]], [jnp.asarray(m) for m in maps_t[1:]]
        return stagewise.fsp_loss([a, *rest_s], [b, *rest_t])

    def fsp_ref(a, b):
        g_s = torch_fsp([a, *(nchw(m) for m in maps_s[1:])])
        g_t = torch_fsp([b, *(nchw(m).detach() for m in maps_t[1:])])
        return sum((x - y).pow(2).mean() for x, y in zip(g_s, g_t, strict=True))

    check(fsp_ours, fsp_ref, maps_s[0], maps_t[0])
    with pytest.raises(ValueError, match="must be equal at two or more feature points"):
        stagewise.fsp_loss([jnp.zeros((2, 4, 4, 3))] * 2, [jnp.zeros((2, 4, 4, 4))] * 2)


def test_factor_loss_paraphraser_and_translator_are_the_references():
    check(stagewise.factor_loss, torch_factor_loss, rand(2, 8, 8, 3), rand(2, 4, 4, 5, seed=1))
    check(stagewise.factor_loss, torch_factor_loss, rand(2, 4, 4, 3), rand(2, 8, 8, 5, seed=1))
    check(stagewise.factor_loss, torch_factor_loss, rand(2, 5, 5, 3), rand(2, 3, 3, 5, seed=1))
    f_t = rand(2, 4, 4, 6, seed=3)
    para = stagewise.Paraphraser(6)
    p = para.init(jax.random.key(0), jnp.asarray(f_t))["params"]
    factor, rec = para.apply({"params": p}, jnp.asarray(f_t))
    assert factor.shape == (2, 4, 4, 3) and rec.shape == f_t.shape
    only = para.apply({"params": p}, jnp.asarray(f_t), factor_only=True)
    np.testing.assert_array_equal(np.asarray(only), np.asarray(factor))
    x = nchw(f_t).detach()
    for i in range(3):  # models/util.py: Paraphraser(use_bn=False)
        w = np.transpose(np.asarray(p[f"encoder{i}"]["kernel"]), (3, 2, 0, 1)).copy()
        x = F.leaky_relu(
            F.conv2d(
                x, torch.tensor(w), torch.tensor(np.asarray(p[f"encoder{i}"]["bias"])), padding=1
            ),
            0.1,
        )
    np.testing.assert_allclose(
        np.moveaxis(x.numpy(), 1, -1), np.asarray(factor), rtol=1e-4, atol=1e-6
    )
    for i in range(3):  # ConvTranspose2d(k=3, s=1, p=1); flax's transposed kernel (h, w, out, in)
        w = np.transpose(np.asarray(p[f"decoder{i}"]["kernel"]), (3, 2, 0, 1)).copy()
        x = F.conv_transpose2d(
            x, torch.tensor(w), torch.tensor(np.asarray(p[f"decoder{i}"]["bias"])), padding=1
        )
        x = F.leaky_relu(x, 0.1)
    np.testing.assert_allclose(np.moveaxis(x.numpy(), 1, -1), np.asarray(rec), rtol=1e-4, atol=1e-6)
    recon = stagewise.reconstruction_loss(rec, jnp.asarray(f_t))
    np.testing.assert_allclose(float(recon), float(F.mse_loss(x, nchw(f_t).detach())), rtol=1e-5)
    f_s = rand(3, 4, 4, 2, seed=4)
    trans = stagewise.Translator(6)
    tp = trans.init(jax.random.key(1), jnp.asarray(f_s))["params"]
    y = nchw(f_s).detach()
    for i in range(3):  # models/util.py: Translator(use_bn=True), batch norm in train mode
        w = np.transpose(np.asarray(tp[f"conv{i}"]["kernel"]), (3, 2, 0, 1)).copy()
        y = F.conv2d(
            y, torch.tensor(w), torch.tensor(np.asarray(tp[f"conv{i}"]["bias"])), padding=1
        )
        y = F.leaky_relu(torch.nn.BatchNorm2d(y.shape[1]).train()(y), 0.1)
    ours = trans.apply({"params": tp}, jnp.asarray(f_s))
    assert ours.shape == (3, 4, 4, 3)
    np.testing.assert_allclose(
        np.moveaxis(y.detach().numpy(), 1, -1), np.asarray(ours), rtol=1e-4, atol=1e-5
    )


# ----------------------------------------------------------------- CRD


class TorchContrastMemory:
    """crd/memory.py's ContrastMemory forward, the banks given (not drawn)."""

    def __init__(self, memory_v1, memory_v2, n_data, t, momentum):
        self.memory_v1, self.memory_v2 = torch.tensor(memory_v1), torch.tensor(memory_v2)
        self.n, self.t, self.m = n_data, t, momentum
        self.z_v1 = self.z_v2 = -1.0

    def __call__(self, v1, v2, y, idx):
        b, k1 = idx.shape
        d = self.memory_v1.shape[1]
        w1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach().view(b, k1, d)
        out_v2 = torch.exp(torch.bmm(w1, v2.view(b, d, 1)) / self.t)
        w2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach().view(b, k1, d)
        out_v1 = torch.exp(torch.bmm(w2, v1.view(b, d, 1)) / self.t)
        if self.z_v1 < 0:
            self.z_v1 = out_v1.mean().item() * self.n
        if self.z_v2 < 0:
            self.z_v2 = out_v2.mean().item() * self.n
        out_v1, out_v2 = out_v1 / self.z_v1, out_v2 / self.z_v2
        with torch.no_grad():
            for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                pos = torch.index_select(memory, 0, y.view(-1)) * self.m + v * (1 - self.m)
                memory.index_copy_(0, y, pos / pos.pow(2).sum(1, keepdim=True).pow(0.5))
        return out_v1, out_v2


def torch_contrast_loss(x, n_data, eps=1e-7):  # crd/criterion.py: ContrastLoss
    bsz, m = x.shape[0], x.size(1) - 1
    pn = 1 / float(n_data)
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log_()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log_()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_crd_two_steps_with_the_memory_update_are_the_references():
    """Two batches (the second sees the banks the first updated and the Z the first set):
    the loss, both embeddings' gradients and both banks, against ContrastMemory/CRDLoss."""
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    state = contrastive.init_crd_state(jax.random.key(0), len(labels), dim=8)
    index = contrastive.class_index(labels)
    stdv = 1 / np.sqrt(8 / 3)
    assert state.memory_s.shape == (10, 8) and float(jnp.max(jnp.abs(state.memory_s))) <= stdv
    assert float(state.z_s) == -1.0
    ref = TorchContrastMemory(np.asarray(state.memory_s), np.asarray(state.memory_t), 10, 0.07, 0.5)
    step = jax.jit(jax.value_and_grad(contrastive.crd_loss, argnums=(0, 1), has_aux=True))
    for batch, own in enumerate(([0, 4, 8], [1, 5, 9])):
        own = np.array(own)
        key = jax.random.key(batch)
        idx = contrastive.sample_contrast_indices(
            key, index, jnp.asarray(own), jnp.asarray(labels[own]), k=6
        )
        idx_np = np.asarray(idx)
        assert idx_np.shape == (3, 7) and np.array_equal(idx_np[:, 0], own)
        assert all(
            labels[j] != labels[i] for i, row in zip(own, idx_np, strict=True) for j in row[1:]
        )
        v_s, v_t = unit(rand(3, 8, seed=batch)), unit(rand(3, 8, seed=10 + batch))
        (loss, state), grads = step(jnp.asarray(v_s), jnp.asarray(v_t), state, idx)
        ts, tt = (torch.tensor(v, requires_grad=True) for v in (v_s, v_t))
        out_s, out_t = ref(ts, tt, torch.tensor(own), torch.tensor(idx_np, dtype=torch.long))
        expected = torch_contrast_loss(out_s, 10) + torch_contrast_loss(out_t, 10)
        expected.backward()
        np.testing.assert_allclose(float(loss), float(expected.detach()), rtol=RTOL)
        for ours, theirs in zip(grads, (ts, tt), strict=True):
            np.testing.assert_allclose(np.asarray(ours), theirs.grad.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(state.z_s), ref.z_v1, rtol=RTOL)
        np.testing.assert_allclose(float(state.z_t), ref.z_v2, rtol=RTOL)
        np.testing.assert_allclose(
            np.asarray(state.memory_s), ref.memory_v1.numpy(), rtol=1e-6, atol=1e-7
        )
        np.testing.assert_allclose(
            np.asarray(state.memory_t), ref.memory_v2.numpy(), rtol=1e-6, atol=1e-7
        )
    with pytest.raises(ValueError, match="one"):
        contrastive.class_index(np.zeros(5, int))


def test_crd_negatives_are_uniform_over_the_other_classes():
    labels = np.array([2, 0, 2, 1, 1, 2, 0, 2])
    index = contrastive.class_index(labels)
    own = jnp.asarray([0, 1, 3])
    idx = contrastive.sample_contrast_indices(
        jax.random.key(1), index, own, jnp.asarray(labels[[0, 1, 3]]), k=4000
    )
    for row, c in zip(np.asarray(idx), labels[[0, 1, 3]], strict=True):
        drawn = np.bincount(row[1:], minlength=8) / 4000
        others = labels != c
        np.testing.assert_allclose(drawn[others], 1 / others.sum(), atol=0.03)
        assert not drawn[~others].any()
    embed = contrastive.Embed(5)
    p = embed.init(jax.random.key(0), jnp.zeros((2, 3, 3)))
    v = embed.apply(p, jnp.asarray(rand(2, 3, 3)))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(v), axis=1), 1.0, rtol=1e-6)


def test_every_new_loss_has_finite_gradients_on_all_zero_features():
    """Dead features (all zero, as a ReLU map can be) give finite values and gradients: the
    norms divide by max(‖x‖, eps) as PyTorch's F.normalize, the distances by no zero."""
    z4, z2 = jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 8))

    def total(a, v):
        embed = contrastive.Embed(4)
        emb = embed.apply(embed.init(jax.random.key(0), v), v)
        labels = np.array([0, 1, 0, 1])
        state = contrastive.init_crd_state(jax.random.key(1), 4, dim=4)
        idx = contrastive.sample_contrast_indices(
            jax.random.key(2), contrastive.class_index(labels), jnp.arange(2), jnp.arange(2), k=2
        )
        crd, new = contrastive.crd_loss(emb, emb, state, idx)
        loss = (
            stagewise.ab_loss([a], [a])
            + stagewise.fsp_loss([a, a], [a, a])
            + stagewise.factor_loss(a, a)
            + stagewise.reconstruction_loss(a, a)
            + crd
        )
        return loss, new

    (value, new), grads = jax.jit(jax.value_and_grad(total, (0, 1), has_aux=True))(z4, z2)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
