"""The cross-architecture models of RepDistiller's benchmark (MobileNetV2, ShuffleV1, ShuffleV2,
ResNet50: at_jax.models.cifar_mobile and cifar) against PyTorch modules of the reference layout
written here from its models/mobilenetv2.py, ShuffleNetv1.py, ShuffleNetv2.py and resnetv2.py
(b84f547), under its module names: parameter counts, and the same logits and feature points in
eval mode with the reference's state dict converted as ``python -m at_jax.convert --repdistiller``
does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cifar_models import close, randomize
from test_fidelity import torch

from at_jax.convert import to_variables
from at_jax.models import forward, get_model
from at_jax.models.cifar_mobile import MOBILENET_SETTING, channel_shuffle

nn = torch.nn
F = torch.nn.functional


def bn_conv(cin, cout, k=1, stride=1, groups=1):
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)


def shuffle(x, g):
    n, c, h, w = x.shape
    return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class TorchInvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, t):
        super().__init__()
        hidden = cin * t
        c1, b1 = bn_conv(cin, hidden)
        c2, b2 = bn_conv(hidden, hidden, 3, stride, hidden)
        c3, b3 = bn_conv(hidden, cout)
        self.conv = nn.Sequential(c1, b1, nn.ReLU(), c2, b2, nn.ReLU(), c3, b3)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class TorchMobileNetV2(nn.Module):
    """mobile_half: T=6, width 0.5, the reference's AvgPool2d(2, ceil_mode=True) at 32×32."""

    def __init__(self, classes=100):
        super().__init__()
        self.conv1 = nn.Sequential(*bn_conv(3, 16, 3, 2), nn.ReLU())
        blocks, cin = [], 16
        for t, c, n, s in MOBILENET_SETTING:
            layers = []
            for j in range(n):
                layers.append(TorchInvertedResidual(cin, c // 2, s if j == 0 else 1, t))
                cin = c // 2
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.conv2 = nn.Sequential(*bn_conv(cin, 1280), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(1280, classes))

    def forward(self, x):
        x = self.conv1(x)
        feats = {"stem": x}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in (1, 2, 4, 6):
                k = (1, 2, 4, 6).index(i) + 1
                feats[f"block{k}"] = feats[f"block{k}.preact"] = x
        x = nn.AvgPool2d(2, ceil_mode=True)(self.conv2(x)).flatten(1)
        feats["features"] = x
        return self.classifier(x), feats


class TorchShuffleV1Block(nn.Module):
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        mid, self.g, self.stride = cout // 4, 1 if cin == 24 else groups, stride
        self.conv1, self.bn1 = bn_conv(cin, mid, groups=self.g)
        self.conv2, self.bn2 = bn_conv(mid, mid, 3, stride, mid)
        self.conv3, self.bn3 = bn_conv(mid, cout, groups=groups)

    def forward(self, x):
        out = shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:
            pre = torch.cat([out, nn.AvgPool2d(3, stride=2, padding=1)(x)], 1)
        else:
            pre = out + x
        return F.relu(pre), pre


class TorchShuffleV1(nn.Module):
    def __init__(self, classes=100):
        super().__init__()
        self.conv1, self.bn1 = bn_conv(3, 24)
        cin = 24
        for k, (width, n) in enumerate(zip((240, 480, 960), (4, 8, 4), strict=True), start=1):
            blocks = []
            for i in range(n):
                blocks.append(
                    TorchShuffleV1Block(cin, width - (cin if i == 0 else 0), 2 if i == 0 else 1, 3)
                )
                cin = width
            setattr(self, f"layer{k}", nn.Sequential(*blocks))
        self.linear = nn.Linear(960, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = {"stem": x}
        for k in (1, 2, 3):
            for block in getattr(self, f"layer{k}"):
                x, pre = block(x)
            feats[f"layer{k}"], feats[f"layer{k}.preact"] = x, pre
        x = F.avg_pool2d(x, 4).flatten(1)
        feats["features"] = x
        return self.linear(x), feats


class TorchShuffleV2Basic(nn.Module):
    def __init__(self, channels):
        super().__init__()
        c = channels // 2
        self.conv1, self.bn1 = bn_conv(c, c)
        self.conv2, self.bn2 = bn_conv(c, c, 3, 1, c)
        self.conv3, self.bn3 = bn_conv(c, c)

    def forward(self, x):
        x1, x2 = x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2 :]
        pre = self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))))
        return shuffle(torch.cat([x1, F.relu(pre)], 1), 2), torch.cat([x1, pre], 1)


class TorchShuffleV2Down(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.conv1, self.bn1 = bn_conv(cin, cin, 3, 2, cin)
        self.conv2, self.bn2 = bn_conv(cin, mid)
        self.conv3, self.bn3 = bn_conv(cin, mid)
        self.conv4, self.bn4 = bn_conv(mid, mid, 3, 2, mid)
        self.conv5, self.bn5 = bn_conv(mid, mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return shuffle(torch.cat([left, right], 1), 2), None


class TorchShuffleV2(nn.Module):
    def __init__(self, classes=100):
        super().__init__()
        self.conv1, self.bn1 = bn_conv(3, 24)
        cin = 24
        for k, (width, n) in enumerate(zip((116, 232, 464), (3, 7, 3), strict=True), start=1):
            blocks = [TorchShuffleV2Down(cin, width)]
            blocks += [TorchShuffleV2Basic(width) for _ in range(n)]
            cin = width
            setattr(self, f"layer{k}", nn.Sequential(*blocks))
        self.conv2, self.bn2 = bn_conv(464, 1024)
        self.linear = nn.Linear(1024, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = {"stem": x}
        for k in (1, 2, 3):
            for block in getattr(self, f"layer{k}"):
                x, pre = block(x)
            feats[f"layer{k}"], feats[f"layer{k}.preact"] = x, pre
        x = F.avg_pool2d(F.relu(self.bn2(self.conv2(x))), 4).flatten(1)
        feats["features"] = x
        return self.linear(x), feats


class TorchBottleneck(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = bn_conv(cin, planes)
        self.conv2, self.bn2 = bn_conv(planes, planes, 3, stride)
        self.conv3, self.bn3 = bn_conv(planes, 4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != 4 * planes:
            self.shortcut = nn.Sequential(*bn_conv(cin, 4 * planes, 1, stride))

    def forward(self, x):
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        pre = self.bn3(self.conv3(out)) + self.shortcut(x)
        return F.relu(pre), pre


class TorchResNet50(nn.Module):
    def __init__(self, classes=100, stages=(3, 4, 6, 3)):
        super().__init__()
        self.conv1, self.bn1 = bn_conv(3, 64, 3)
        cin = 64
        for k, n in enumerate(stages, start=1):
            planes = 64 * 2 ** (k - 1)
            blocks = []
            for i in range(n):
                blocks.append(TorchBottleneck(cin, planes, 2 if k > 1 and i == 0 else 1))
                cin = 4 * planes
            setattr(self, f"layer{k}", nn.Sequential(*blocks))
        self.linear = nn.Linear(2048, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = {"stem": x}
        for k in (1, 2, 3, 4):
            for block in getattr(self, f"layer{k}"):
                x, pre = block(x)
            feats[f"layer{k}"], feats[f"layer{k}.preact"] = x, pre
        x = x.mean((2, 3))
        feats["features"] = x
        return self.linear(x), feats


TORCH = {
    "MobileNetV2": TorchMobileNetV2,
    "ShuffleV1": TorchShuffleV1,
    "ShuffleV2": TorchShuffleV2,
    "ResNet50": TorchResNet50,
}
# counted from RepDistiller's own modules (b84f547, 100 classes)
REFERENCE_PARAMETERS = {
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
    "ResNet50": 23_705_252,
}


def test_parameter_counts_equal_the_references_and_28_pixel_images_work():
    """(at 28×28, Fashion-MNIST's size, which the reference's fixed pooling windows reject)"""
    for name, count in REFERENCE_PARAMETERS.items():
        model = get_model(name, num_classes=100)
        x = jnp.zeros((2, 28, 28, 3))
        logits, shapes = jax.eval_shape(model.init_with_output, jax.random.key(0), x)
        ours = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))
        assert ours == count == sum(p.numel() for p in TORCH[name]().parameters()), name
        assert logits.shape == (2, 100), name


@pytest.mark.parametrize("name", list(TORCH))
def test_logits_and_feature_points_equal_the_reference_layout(name):
    reference = randomize(TORCH[name](), 0)
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    variables, classes = to_variables(state_dict, name, 32, "repdistiller")
    assert classes == 100
    model = get_model(name, num_classes=100)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want, feats = reference(torch.tensor(x))
    logits, acts, _ = jax.jit(lambda v, x: forward(model, v, x))(
        variables, jnp.asarray(x.transpose(0, 2, 3, 1))
    )
    close(logits, want.numpy(), "logits")
    assert set(acts) == set(feats)
    for key, value in feats.items():
        value = value.numpy()
        close(acts[key], value.transpose(0, 2, 3, 1) if value.ndim == 4 else value, key)


def test_channel_shuffle_is_the_references():
    x = np.arange(2 * 12 * 2 * 2, dtype=np.float32).reshape(2, 12, 2, 2)
    want = shuffle(torch.tensor(x), 3).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(channel_shuffle(jnp.asarray(x.transpose(0, 2, 3, 1)), 3), want)


@pytest.mark.heavy
def test_every_method_of_the_cross_table_runs_on_every_pair(table="cross"):
    """configs/cifar100.py:METHOD,TEACHER,STUDENT of every cross pair and method: valid, the
    small students at lr 0.01; and every method's loss (all in one objective, shapes only) on
    both networks of every pair, where their feature maps differ in size and channels."""
    from at_jax import recipes
    from at_jax.data import DataSpec
    from at_jax.networks import Networks
    from at_jax.terms import TermData
    from configs import cifar100
    from experiments.repdistiller_tables import CROSS_PAIRS, TABLE_METHODS

    spec = DataSpec(100, (32, 32, 3), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    for teacher, student in CROSS_PAIRS:
        config = cifar100.get_config(f"kd,{teacher},{student}")
        for method in TABLE_METHODS[table]:
            one = cifar100.get_config(f"{method},{teacher},{student}")
            recipes.validate_config(one)
            small = student in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
            assert one.optimizer.lr == (0.01 if small else 0.05), (method, student)
            for name in one.loss:
                if name not in config.loss or method == name:
                    config.loss[name] = one.loss[name]
            if "init_epochs" in config.loss.get(method, {}):
                config.loss[method].init_epochs = 0
        t_model = get_model(teacher, num_classes=100)
        x = jnp.zeros((8, 32, 32, 3))
        t_vars = jax.eval_shape(t_model.init, jax.random.key(0), x)
        data = TermData(64, np.arange(64) % 100)
        net = Networks.from_config(
            config, spec, teacher_model=t_model, teacher_variables=t_vars, term_data=data
        )
        assert len(net.terms) >= len(TABLE_METHODS[table]), sorted(net.terms)

        assert _loss_shape(net, t_vars, x) == (), (teacher, student)


def _loss_shape(net, t_vars, x):
    """The shape of the objective of ``net``'s terms on ``x`` (traced only)."""
    from at_jax.networks import init_states
    from at_jax.objective import make_stateful_objective

    def loss(key, t_vars):
        variables, terms = net.init(key, key)
        out, _ = net.outputs(
            {"student": variables["params"], "terms": terms},
            variables.get("batch_stats"),
            t_vars,
            (x, jnp.zeros(len(x), jnp.int32)),
            key,
            weight_scale=1.0,
            epoch=1,
            term_states=init_states(net, key),
            example_index=jnp.arange(len(x)),
            terms_key=key,
        )
        return make_stateful_objective(net.terms)(out)[0]

    return jax.eval_shape(loss, jax.random.key(0), t_vars).shape


def test_maps_of_any_ratio_are_compared_as_repdistiller_and_otherwise_left_out():
    """vgg13 → MobileNetV2 at 28×28 (Fashion-MNIST): the last maps are 3×3 and 4×4. The
    benchmark's AT pools the larger activation adaptively (RepDistiller's ``at_loss``): its cell
    trains and its evaluation measures the distance at the groups. A KD cell (maps compared by
    an integer factor) leaves the evaluation's attention distance out instead of stopping the
    run; at 32×32 (4×4 and 2×2) it is measured."""
    from at_jax.data import DataSpec
    from at_jax.networks import Networks
    from configs import cifar100

    cases = (("kd", 28, None), ("kd", 32, "groups"), ("at", 28, "groups"))
    for method, size, want in cases:
        config = cifar100.get_config(f"{method},vgg13,MobileNetV2")
        spec = DataSpec(10, (size, size, 1), (0.5,), (0.25,))
        t_model = get_model("vgg13", num_classes=10)
        x = jnp.zeros((2, size, size, 1))
        t_vars = jax.eval_shape(t_model.init, jax.random.key(0), x)
        net = Networks.from_config(config, spec, teacher_model=t_model, teacher_variables=t_vars)
        assert net.attention_pairs() == want, (method, size)
        if method == "at":
            assert net.pool == "activation" and _loss_shape(net, t_vars, x) == ()
    config.loss.at.pool = "map"  # the strict form refuses the pair with what to do
    with pytest.raises(ValueError, match=r"\(4, 4\) and \(3, 3\).*pool=.activation."):
        Networks.from_config(config, spec, teacher_model=t_model, teacher_variables=t_vars)
