"""The distillation baselines (at_jax.distill) against PyTorch references written here from
RepDistiller's distiller_zoo (b84f547) and mdistiller's DKD (a08d46f): values and gradients on
seeded random features, float32, channels-first on the PyTorch side."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fidelity import torch

from at_jax import objective
from at_jax.distill import features, logits, relational
from at_jax.distill.terms import REFERENCE_WEIGHTS

F = torch.nn.functional
RTOL = 1e-5


def rand(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def nchw(x):
    return torch.tensor(np.ascontiguousarray(np.moveaxis(x, -1, 1)), requires_grad=True)


def check(jax_fn, torch_fn, s, t, layout=nchw, rtol=RTOL, teacher_fixed=True):
    """``jax_fn(s, t)`` against ``torch_fn`` (channels first): values and the student's
    gradient; the teacher's gradient is zero on our side (stop_gradient), or, where the
    reference trains what reads the teacher (``teacher_fixed=False``), PyTorch's."""
    # one compiled program (op by op, each operation of each shape would compile on its own)
    value_and_grad = jax.jit(jax.value_and_grad(jax_fn, argnums=(0, 1)))
    value, grads = value_and_grad(jnp.asarray(s), jnp.asarray(t))
    ts, tt = layout(s), layout(t)
    ref = torch_fn(ts, tt.detach() if teacher_fixed else tt)
    ref.backward()
    np.testing.assert_allclose(float(value), float(ref.detach()), rtol=rtol, atol=1e-7)
    for ours, side in zip(grads, (ts, tt) if not teacher_fixed else (ts,), strict=False):
        expected = side.grad.numpy()
        expected = np.moveaxis(expected, 1, -1) if layout is nchw else expected
        scale = np.abs(expected).max()
        np.testing.assert_allclose(np.asarray(ours), expected, rtol=rtol, atol=rtol * scale)
        assert scale > 0
    if teacher_fixed:
        assert not np.any(np.asarray(grads[1]))


def as_is(x):
    return torch.tensor(x, requires_grad=True)


# ----------------------------------------------------------------- PyTorch references


def torch_sp(f_s, f_t):  # distiller_zoo/SP.py
    b = f_s.shape[0]
    g_s = F.normalize(torch.mm(f_s.view(b, -1), f_s.view(b, -1).t()))
    g_t = F.normalize(torch.mm(f_t.view(b, -1), f_t.view(b, -1).t()))
    return ((g_t - g_s) ** 2).sum() / (b * b)


def torch_cc(f_s, f_t):  # distiller_zoo/CC.py
    delta = torch.abs(f_s - f_t)
    return torch.mean((delta[:-1] * delta[1:]).sum(1))


def torch_pdist(e, eps=1e-12):
    sq = e.pow(2).sum(dim=1)
    res = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def torch_rkd(f_s, f_t, w_d=25, w_a=50):  # distiller_zoo/RKD.py
    s, t = f_s.view(f_s.shape[0], -1), f_t.view(f_t.shape[0], -1)
    t_d = torch_pdist(t)
    t_d = t_d / t_d[t_d > 0].mean()
    d = torch_pdist(s)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    nt = F.normalize(t.unsqueeze(0) - t.unsqueeze(1), p=2, dim=2)
    ns = F.normalize(s.unsqueeze(0) - s.unsqueeze(1), p=2, dim=2)
    t_angle = torch.bmm(nt, nt.transpose(1, 2)).view(-1)
    s_angle = torch.bmm(ns, ns.transpose(1, 2)).view(-1)
    return w_d * loss_d + w_a * F.smooth_l1_loss(s_angle, t_angle)


def torch_pkt(o, t, eps=1e-7):  # distiller_zoo/PKT.py
    o = o / (torch.sqrt(torch.sum(o**2, dim=1, keepdim=True)) + eps)
    t = t / (torch.sqrt(torch.sum(t**2, dim=1, keepdim=True)) + eps)
    ms, ts = (torch.mm(o, o.t()) + 1.0) / 2.0, (torch.mm(t, t.t()) + 1.0) / 2.0
    ms, ts = ms / ms.sum(1, keepdim=True), ts / ts.sum(1, keepdim=True)
    return torch.mean(ts * torch.log((ts + eps) / (ms + eps)))


def torch_nst(f_s, f_t):  # distiller_zoo/NST.py (full_loss)
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    f_s = F.normalize(f_s.view(f_s.shape[0], f_s.shape[1], -1), dim=2)
    f_t = F.normalize(f_t.view(f_t.shape[0], f_t.shape[1], -1), dim=2)

    def poly(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    return poly(f_t, f_t).mean().detach() + poly(f_s, f_s).mean() - 2 * poly(f_s, f_t).mean()


def torch_dkd(ls, lt, target, alpha, beta, temp):  # mdistiller/distillers/DKD.py
    gt = torch.zeros_like(ls).scatter_(1, target.unsqueeze(1), 1).bool()
    other = torch.ones_like(ls).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat(t):
        return torch.cat([(t * gt).sum(1, keepdims=True), (t * other).sum(1, keepdims=True)], 1)

    ps, pt = cat(F.softmax(ls / temp, 1)), cat(F.softmax(lt / temp, 1))
    tckd = F.kl_div(torch.log(ps), pt, reduction="sum") * temp**2 / target.shape[0]
    pt2 = F.softmax(lt / temp - 1000.0 * gt, dim=1)
    ls2 = F.log_softmax(ls / temp - 1000.0 * gt, dim=1)
    nckd = F.kl_div(ls2, pt2, reduction="sum") * temp**2 / target.shape[0]
    return alpha * tckd + beta * nckd


# ----------------------------------------------------------------- the array functions


def test_sp_on_maps_of_other_channel_counts_is_the_references():
    check(relational.sp_loss, torch_sp, rand(6, 4, 4, 3), rand(6, 4, 4, 5, seed=1))


def test_cc_reference_form_and_the_papers_kernel():
    check(relational.cc_loss, torch_cc, rand(6, 8), rand(6, 8, seed=1), as_is, teacher_fixed=False)
    e_s, e_t = jnp.asarray(rand(5, 8)), jnp.asarray(rand(5, 8, seed=1))
    paper = relational.cc_loss(e_s, e_t, form="paper", gamma=0.4, order=2)

    def correlation(e):  # the expansion written out, p = 0, 1, 2
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        k = e @ e.T
        return np.exp(-0.8) * (1 + 0.8 * k + 0.32 * k**2)

    expected = np.sum((correlation(np.asarray(e_t)) - correlation(np.asarray(e_s))) ** 2) / 25
    np.testing.assert_allclose(float(paper), expected, rtol=1e-5)
    assert float(relational.cc_loss(e_s, e_s, form="paper")) == 0.0
    with pytest.raises(ValueError, match="'reference' or 'paper'"):
        relational.cc_loss(e_s, e_t, form="rbf")


def test_rkd_distance_and_angle_with_the_reference_weights():
    check(relational.rkd_loss, torch_rkd, rand(6, 2, 2, 3), rand(6, 2, 2, 4, seed=1))
    only_d = relational.rkd_loss(jnp.asarray(rand(5, 4)), jnp.asarray(rand(5, 4, seed=1)), 1, 0)
    assert float(only_d) > 0


def test_pkt_is_the_authors_cosine_kernel_kl():
    check(relational.pkt_loss, torch_pkt, rand(6, 8), rand(6, 5, seed=1), layout=as_is)


def test_nst_pools_the_larger_map_and_is_the_references_mmd():
    check(features.nst_loss, torch_nst, rand(3, 4, 4, 3), rand(3, 4, 4, 5, seed=1))
    check(features.nst_loss, torch_nst, rand(3, 8, 8, 3), rand(3, 4, 4, 2, seed=1))
    # any ratio, as adaptive_avg_pool2d: 7x7 -> 4x4 (overlapping bins), 3x3 <- 4x4
    check(features.nst_loss, torch_nst, rand(3, 7, 7, 3), rand(3, 4, 4, 2, seed=1))
    check(features.nst_loss, torch_nst, rand(3, 3, 3, 3), rand(3, 4, 4, 2, seed=1))
    nchw_value = features.nst_loss(
        jnp.moveaxis(rand(3, 4, 4, 3), -1, 1), jnp.moveaxis(rand(3, 4, 4, 5, seed=1), -1, 1), 1
    )
    nhwc_value = features.nst_loss(jnp.asarray(rand(3, 4, 4, 3)), rand(3, 4, 4, 5, seed=1))
    np.testing.assert_allclose(float(nchw_value), float(nhwc_value), rtol=1e-6)


def torch_at(f_s, f_t, p=2):  # distiller_zoo/AT.py: Attention.at_loss
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))

    def at(f):
        return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))

    return (at(f_s) - at(f_t)).pow(2).mean()


@pytest.mark.parametrize("s_hw,t_hw", [(4, 4), (8, 4), (7, 4), (3, 4), (4, 2)])
def test_at_loss_with_activation_pooling_is_repdistillers_at(s_hw, t_hw):
    """``pool="activation"``: the larger activation adaptive-average-pooled before its map, at
    any ratio (vgg13 -> MobileNetV2 at 28x28 pairs 3x3 with 4x4)."""
    from at_jax.losses import at_loss

    def ours(a, b):
        return at_loss(a, b, pool="activation")

    check(ours, torch_at, rand(2, s_hw, s_hw, 3), rand(2, t_hw, t_hw, 5, seed=1))


@pytest.mark.parametrize("temperature,labels", [(4.0, [0, 3, 2, 1]), (1.0, [4, 4, 0, 1])])
def test_dkd_and_its_warmup_are_mdistillers(temperature, labels):
    y = np.array(labels)
    s, t = rand(4, 5, scale=3), rand(4, 5, seed=1, scale=3)

    def ours(a, b):
        return logits.dkd_loss(a, b, jnp.asarray(y), 1.0, 8.0, temperature)

    def ref(a, b):
        return torch_dkd(a, b, torch.tensor(y), 1.0, 8.0, temperature)

    check(ours, ref, s, t, layout=as_is)
    warm = [float(logits.dkd_warmup(e, 20)) for e in (1, 10, 20, 40)]
    assert warm == pytest.approx([0.05, 0.5, 1.0, 1.0], rel=1e-6)


def test_fitnet_regressor_and_hint_loss_are_convreg_and_mse():
    """ConvReg's three cases with the weights mapped (NCHW ↔ NHWC), and the MSE."""
    for s_size, t_size in ((4, 4), (8, 4), (4, 8), (5, 4)):
        x = rand(3, s_size, s_size, 2)
        module = features.ConvRegressor(3, (s_size, s_size), (t_size, t_size))
        variables = module.init(jax.random.key(0), jnp.asarray(x))
        kernel = np.asarray(variables["params"]["conv"]["kernel"])
        bias = np.asarray(variables["params"]["conv"]["bias"])
        if 2 * s_size == t_size:
            conv = torch.nn.ConvTranspose2d(2, 3, 4, 2, 1)
            conv.weight.data = torch.tensor(np.transpose(kernel, (3, 2, 0, 1)).copy())
        else:
            k = kernel.shape[0]
            stride = 2 if s_size == 2 * t_size else 1
            conv = torch.nn.Conv2d(2, 3, k, stride, k // 2 if k == 3 else 0)
            conv.weight.data = torch.tensor(np.transpose(kernel, (3, 2, 0, 1)).copy())
        conv.bias.data = torch.tensor(bias)
        ref = F.relu(torch.nn.BatchNorm2d(3).train()(conv(torch.tensor(np.moveaxis(x, -1, 1)))))
        ours = module.apply(variables, jnp.asarray(x))
        assert ours.shape == (3, t_size, t_size, 3)
        np.testing.assert_allclose(
            np.asarray(ours), np.moveaxis(ref.detach().numpy(), 1, -1), rtol=1e-4, atol=1e-5
        )
    with pytest.raises(ValueError, match="cannot map a student map of 2×2"):
        features.ConvRegressor(3, (2, 2), (5, 5)).init(jax.random.key(0), jnp.zeros((1, 2, 2, 2)))
    check(features.hint_loss, F.mse_loss, rand(2, 3, 3, 4), rand(2, 3, 3, 4, seed=1))
    with pytest.raises(ValueError, match="regress the student's"):
        features.hint_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


def test_vid_regressor_variance_and_nll_are_the_references():
    x, target = rand(2, 4, 4, 3), rand(2, 4, 4, 5, seed=1)
    module = features.VIDRegressor(5, 5)
    variables = module.init(jax.random.key(0), jnp.asarray(x))
    p = variables["params"]
    log_scale = np.asarray(p["log_scale"])
    np.testing.assert_allclose(log_scale, np.log(np.exp(5.0 - 1e-5) - 1.0), rtol=1e-6)

    def ours(inp, tgt):
        return features.vid_loss(*module.apply(variables, inp), tgt)

    def ref(inp, tgt):  # distiller_zoo/VID.py with the weights mapped
        h = inp
        for i in range(3):
            w = np.transpose(np.asarray(p[f"conv{i}"]["kernel"]), (3, 2, 0, 1)).copy()
            h = F.conv2d(h, torch.tensor(w))
            h = F.relu(h) if i < 2 else h
        var = (torch.log(1.0 + torch.exp(torch.tensor(log_scale))) + 1e-5).view(1, -1, 1, 1)
        return torch.mean(0.5 * ((h - tgt) ** 2 / var + torch.log(var)))

    check(ours, ref, x, target)


# ----------------------------------------------------------------- the terms


def test_baselines_are_registered_terms_with_the_reference_weights():
    names = set(objective.term_names())
    assert set(REFERENCE_WEIGHTS) <= names
    assert REFERENCE_WEIGHTS["sp"] == 3000.0 and REFERENCE_WEIGHTS["pkt"] == 30000.0
    spec = objective.validate_terms({k: {"weight": w} for k, w in REFERENCE_WEIGHTS.items()})
    assert objective.needs_teacher(spec)
    with pytest.raises(ValueError, match="has no option"):
        objective.validate_terms({"rkd": {"weight": 1.0, "featur": "x"}})


def test_the_first_eight_and_the_attention_maps_have_finite_gradients_on_all_zero_features():
    """Dead features (all zero, as a ReLU map can be): every square root and norm of SP, CC,
    RKD (its sqrt(max(d², eps))), PKT, NST, FitNet's hint and the 2017 attention maps
    (attention.safe_norm) gives finite values and gradients for the student."""
    from at_jax import losses

    z4, z2 = jnp.zeros((4, 4, 4, 3)), jnp.zeros((4, 8))

    def total(s4, s2):
        acts = {"group0": s4}
        return (
            relational.sp_loss(s4, z4)
            + relational.cc_loss(s2, z2)
            + relational.cc_loss(s2, z2, "paper")
            + relational.rkd_loss(s2, z2)
            + relational.pkt_loss(s2, z2)
            + features.nst_loss(s4, z4)
            + features.hint_loss(s4, z4)
            + losses.at_losses(acts, {"group0": z4}, "groups")[0]
        )

    value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(z4, z2)
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
