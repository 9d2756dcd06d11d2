"""What a research user hits first on their own models (issue 23): an all-zero activation (a
blank image through a bias-free convolution) must not make a step NaN, NNX models in train mode
(BN, dropout) under nnx.jit/nnx.grad/jax.jit, shapes and layouts that are refused or flagged,
names that can be listed before guessing, one preprocess per model, and programs that end a user
error with one line."""

import json
import os
import re
import runpy
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from at_jax import gradient, objective
from at_jax.analysis import attention_distance, pair_distances
from at_jax.attention import attention_map, normalize_rows, safe_norm
from at_jax.capture import capture, model_fn, paths
from at_jax.errors import one_line_errors
from at_jax.figures import attention_figure
from at_jax.losses import at_loss, at_losses, cross_entropy, factt_loss, kd_loss
from at_jax.models import get_model
from at_jax.naming import natural_sorted
from conftest import assert_bench_contract, init

if os.environ.get("AT_JAX_REQUIRE_TORCH"):
    import torch
else:
    torch = pytest.importorskip("torch")

F = torch.nn.functional
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------- zero maps: finite gradients


def _torch_at(x):  # the reference code's at(x) on NCHW
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def _torch_grad(fn, *arrays):
    """Gradient of ``fn`` (torch) with respect to its first NHWC array, as NHWC numpy."""
    tensors = [torch.tensor(np.moveaxis(a, -1, 1)) for a in arrays]
    tensors[0].requires_grad_()
    fn(*tensors).backward()
    return np.moveaxis(tensors[0].grad.numpy(), 1, -1)


def test_zero_maps_give_pytorchs_finite_gradients():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 8, 8, 4)).astype(np.float32)
    s[1] = 0.0  # one blank example in the batch
    t = rng.normal(size=(3, 4, 4, 6)).astype(np.float32)  # the teacher at half the resolution
    zero = np.zeros_like(s)  # an all-zero batch

    def torch_at_loss(a, b, paper):
        a = F.avg_pool2d(a.pow(2).mean(1, keepdim=True), 2).squeeze(1).flatten(1)
        qa, qb = F.normalize(a), _torch_at(b)
        return (qa - qb).norm(dim=1).mean() if paper else (qa - qb).pow(2).mean()

    @jax.jit
    def ours(s, z):
        return {
            "code": jax.grad(lambda a: at_loss(a, t))(s),
            "paper": jax.grad(lambda a: at_loss(a, t, mode="paper"))(s),
            "code_zero": jax.grad(lambda a: at_loss(a, t))(z),
            "factt": jax.grad(lambda a: factt_loss(a, jnp.zeros_like(a).at[0].set(1.0)))(s),
            "l1": jax.grad(lambda q: jnp.sum(jnp.arange(64.0) * normalize_rows(q, "l1")))(
                jnp.zeros((2, 64))
            ),
            "distance": jax.grad(
                lambda a: pair_distances({"a": a}, {"a": jnp.asarray(t)}, ["a"])["a<-a"].sum()
            )(s),
        }

    g = ours(s, zero)
    for value in g.values():
        assert np.isfinite(np.asarray(value)).all()
    np.testing.assert_allclose(
        g["code"], _torch_grad(lambda a, b: torch_at_loss(a, b, False), s, t), rtol=1e-5, atol=1e-9
    )
    np.testing.assert_allclose(
        g["paper"], _torch_grad(lambda a, b: torch_at_loss(a, b, True), s, t), rtol=1e-5, atol=1e-8
    )
    np.testing.assert_allclose(
        g["code_zero"], _torch_grad(lambda a, b: torch_at_loss(a, b, False), zero, t), atol=0
    )
    assert float(np.abs(g["code"][1]).max()) == 0.0  # the blank example: zero, as PyTorch's

    def torch_factt(a):
        b = torch.zeros_like(a)
        b[0] = 1.0
        return (F.normalize(a.flatten(1)) - F.normalize(b.flatten(1))).pow(2).mean()

    np.testing.assert_allclose(g["factt"], _torch_grad(torch_factt, s), rtol=1e-5, atol=1e-9)
    q = torch.zeros(2, 64, requires_grad=True)
    (torch.arange(64.0) * F.normalize(q, p=1)).sum().backward()
    np.testing.assert_allclose(g["l1"], q.grad.numpy(), rtol=1e-6)  # 1/eps times, finite
    # safe_norm: jnp.linalg.norm's values, PyTorch's gradient at zero (0, not NaN)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    x[2] = 0.0
    w = np.arange(1.0, 5.0, dtype=np.float32)
    ours_norm = jax.grad(lambda v: jnp.sum(w * safe_norm(v, 2, axis=-1)))(x)
    xt = torch.tensor(x, requires_grad=True)
    (torch.tensor(w) * xt.norm(dim=-1)).sum().backward()
    np.testing.assert_allclose(ours_norm, xt.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(safe_norm(x, 2), np.linalg.norm(x, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(safe_norm(x, 1), np.abs(x).sum(-1), rtol=1e-6)
    assert np.isnan(np.asarray(jax.grad(lambda v: jnp.linalg.norm(v))(jnp.zeros(3)))).all()
    for order in (1, 2):  # an all-zero input: a finite gradient, torch.norm's (zero)
        zero_grad = jax.grad(lambda v, o=order: jnp.sum(safe_norm(v, o)))(jnp.zeros((2, 3)))
        zt = torch.zeros(2, 3, requires_grad=True)
        zt.norm(p=order, dim=-1).sum().backward()
        np.testing.assert_array_equal(zero_grad, zt.grad.numpy())
        assert np.isfinite(zero_grad).all()


class BiasFreeStem(nn.Module):
    """A user's model: bias-free conv stem and ReLU, so a blank image has all-zero maps."""

    width: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.width, (3, 3), use_bias=False, name="stem")(x))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3), use_bias=False, name="stage")(x))
        return nn.Dense(3, name="head")(x.mean((1, 2)))


def test_a_blank_image_in_a_train_step_keeps_every_gradient_finite():
    student, teacher = BiasFreeStem(4), BiasFreeStem(8)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1)).at[2].set(0.0)
    y = jnp.array([0, 1, 2, 0])
    sv, tv = init(student, 0, x), init(teacher, 1, x)
    tx = optax.sgd(0.1, momentum=0.9)
    points = ["stem", "stage"]

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            s_logits, s_acts = capture(student, x, names=points, variables=p)
            t_logits, t_acts = capture(teacher, x, names=points, variables=tv)
            code, _ = at_losses(s_acts, t_acts, points)
            paper, _ = at_losses(s_acts, t_acts, points, mode="paper")
            out = objective.StepOutputs(x, y, s_logits, s_acts, t_logits, t_acts)
            term = objective.at_term(out, pairs=points)  # the registered term the CLI trains
            s_fn, t_fn = (lambda z: student.apply(p, z)), (lambda z: teacher.apply(tv, z))
            grad_terms = gradient.grad_at_loss(s_fn, t_fn, x, y, squared=False)
            grad_terms += gradient.symmetry_loss(s_fn, x, y, squared=False)
            return kd_loss(s_logits, t_logits, y) + 1e3 * (code + paper + term) + grad_terms

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value, grads

    params, _, value, grads = step(sv, tx.init(sv))
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
    assert float(jnp.abs(grads["params"]["stem"]["kernel"]).sum()) > 0  # the AT gradient arrives


# --------------------------------------------------------------------------- NNX in train mode


class TrainNet(nnx.Module):
    """A user's NNX model with batch norm and dropout (train mode by default)."""

    def __init__(self, width, rngs):
        self.conv = nnx.Conv(1, width, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(width, 3, rngs=rngs)

    def __call__(self, x):
        x = self.drop(nnx.relu(self.bn(self.conv(x))))
        return self.head(x.mean((1, 2)))


def _ce_input_grad(graphdef, state, x, y):
    """By hand: ∂ΣCE/∂x of the module given as (graphdef, state), on a copy."""

    def summed(z):
        logits = nnx.merge(graphdef, state, copy=True)(z)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()

    return jax.grad(summed)(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_nnx_in_train_mode_under_nnx_jit_grad_and_jax_jit():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    y = jnp.array([0, 1, 2, 0])
    student, teacher = TrainNet(4, nnx.Rngs(0, dropout=1)), TrainNet(6, nnx.Rngs(2, dropout=3))
    reference = nnx.clone(student)  # the same student, trained with its forward alone
    before = nnx.clone(student)

    @nnx.jit
    def train_step(model):
        def loss(m):
            terms = gradient.grad_at_loss(m, teacher, x, y)  # the teacher in train mode too
            terms += gradient.min_l2_loss(m, x, y) + gradient.symmetry_loss(m, x, y)
            s_logits, s_acts = capture(m, x, names=["conv", "bn"])
            _, t_acts = capture(teacher, x, names=["conv", "bn"])  # closed over: on a copy
            at, _ = at_losses(s_acts, t_acts, ["conv", "bn"])
            return cross_entropy(s_logits, y) + at + terms, terms

        return nnx.grad(loss, has_aux=True)(model)

    grads, terms = train_step(student)
    assert np.isfinite(float(terms)) and float(terms) > 0
    assert float(jnp.abs(grads["conv"]["kernel"][...]).sum()) > 0

    @nnx.jit
    def forward_only(model):
        return cross_entropy(model(x), y)

    forward_only(reference)
    # BN statistics updated once and the dropout RNG advanced once: by the forward alone
    for kind in (nnx.BatchStat, nnx.RngCount):
        jax.tree.map(
            np.testing.assert_array_equal, nnx.state(student, kind), nnx.state(reference, kind)
        )
    teacher_state = nnx.state(teacher, nnx.BatchStat)
    assert float(jnp.abs(teacher_state["bn"]["mean"][...]).sum()) == 0.0  # teacher untouched

    # the values: a copy of the module as it was before the step (same BN batch statistics,
    # same dropout masks), differentiated by hand
    graphdef, state = nnx.split(before)
    t_graphdef, t_state = nnx.split(teacher)

    @jax.jit
    def by_hand_and_ours(state):
        j_s = _ce_input_grad(graphdef, state, x, y)
        j_t = _ce_input_grad(t_graphdef, t_state, x, y)
        hand = 0.5 * jnp.mean(jnp.sum((j_s - j_t).reshape(4, -1) ** 2, -1))
        # jax.jit over split state, the module merged inside the trace
        ours = gradient.grad_at_loss(nnx.merge(graphdef, state), teacher, x, y)
        return hand, ours

    hand, ours_jax_jit = by_hand_and_ours(state)
    np.testing.assert_allclose(ours_jax_jit, hand, rtol=1e-5)
    np.testing.assert_allclose(gradient.grad_at_loss(before, teacher, x, y), hand, rtol=1e-5)

    # a lambda that calls a train-mode module cannot be copied: one clear error
    @nnx.jit
    def with_a_lambda(model):
        return nnx.grad(lambda m: gradient.min_l2_loss(lambda z: m(z), x, y))(model)

    with pytest.raises(ValueError, match=r"pass the NNX module itself"):
        with_a_lambda(nnx.clone(before))


# ------------------------------------------------------------------------- shapes and layouts


def test_token_arrays_and_nchw_layouts_are_refused_or_flagged():
    tokens = jnp.ones((2, 197, 64))
    with pytest.raises(
        ValueError, match=r"\(B, N, D\) tokens.*tokens\[:, 1:\]\.reshape\(2, 14, 14"
    ):
        at_loss(tokens, jnp.ones((2, 197, 256)))
    with pytest.raises(ValueError, match=r"\(B, N, D\) tokens.*reshape\(B, h, w, 64\)"):
        attention_map(jnp.ones((2, 60, 64)))  # no square grid plus a class token
    nchw = jax.random.normal(jax.random.key(0), (2, 16, 8, 8))
    with pytest.warns(UserWarning, match=r"shape \(2, 16, 8, 8\) is read as NHWC.*channel_axis=1"):
        at_loss(nchw, nchw * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right layout, or square NHWC maps: no warning
        at_loss(nchw, nchw * 2, channel_axis=1)
        at_loss(jnp.ones((2, 8, 8, 16)), jnp.ones((2, 8, 8, 4)))


def test_names_sort_naturally_and_can_be_listed_before_capturing():
    assert natural_sorted(["BasicBlock_10", "BasicBlock_2", "layer1/10", "layer1/9"]) == [
        "BasicBlock_2",
        "BasicBlock_10",
        "layer1/9",
        "layer1/10",
    ]
    model = BiasFreeStem(4)
    x = jnp.zeros((2, 8, 8, 1))
    variables = init(model, 0, x)
    listed = paths(model, x, variables=variables)
    assert listed == {"head": (2, 3), "stage": (2, 8, 8, 8), "stem": (2, 8, 8, 4)}
    nnx_model = TrainNet(4, nnx.Rngs(0))
    before = nnx.state(nnx_model, nnx.BatchStat, nnx.RngCount)
    assert paths(nnx_model, x) == {
        "bn": (2, 8, 8, 4),
        "conv": (2, 8, 8, 4),
        "drop": (2, 8, 8, 4),
        "head": (2, 3),
    }
    after = nnx.state(nnx_model, nnx.BatchStat, nnx.RngCount)
    jax.tree.map(np.testing.assert_array_equal, after, before)  # left alone
    # a wrong name on a real ResNet: the closest names first, a short list, where to look
    resnet = get_model("resnet-tiny", num_classes=10)
    xr = jnp.zeros((1, 32, 32, 3))
    rv = init(resnet, 0, xr)
    with pytest.raises(ValueError) as error:
        capture(resnet, xr, names=["layer3_0/bn9"], variables=rv)
    message = str(error.value)
    assert re.search(r"; closest: \['layer3_0/bn[12]', 'layer3_0/bn[12]', .*\]; others: ", message)
    assert "at_jax.capture.paths(model, x, variables=variables)" in message
    assert len(message) < 500 and len(paths(resnet, xr, variables=rv)) > 25


def test_one_preprocess_per_model_in_distance_and_figure(tmp_path):
    student, teacher = BiasFreeStem(4), BiasFreeStem(8)
    x = jnp.zeros((1, 8, 8, 1))
    s_fn = model_fn(student, ["stem"], init(student, 0, x))
    t_fn = model_fn(teacher, ["stem"], init(teacher, 1, x))
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1)).astype(np.uint8)

    def scaled(u):
        return jnp.asarray(u, jnp.float32) / 255.0

    def centred(u):
        return (jnp.asarray(u, jnp.float32) - 128.0) / 64.0

    pairs = [("stem", "stem")]
    both = attention_distance(
        s_fn, t_fn, images, pairs=pairs, preprocess={"student": scaled, "teacher": centred}
    )
    _, s_acts = s_fn(scaled(images))
    _, t_acts = t_fn(centred(images))
    expected = float(pair_distances(s_acts, t_acts, pairs)["stem<-stem"].mean())
    np.testing.assert_allclose(both["stem<-stem"], expected, rtol=1e-5)
    same = attention_distance(s_fn, t_fn, images, pairs=pairs, preprocess=scaled)
    assert abs(same["mean"] - both["mean"]) > 1e-4  # the teacher's own preprocessing counted
    with pytest.raises(ValueError, match=r"entries for \['techer'\].*\['student', 'teacher'\]"):
        attention_distance(s_fn, t_fn, images, pairs=pairs, preprocess={"techer": centred})
    path = attention_figure(
        str(tmp_path / "maps.png"),
        images[:2],
        {"a student with a long label": s_fn, "teacher": t_fn},
        points=["stem"],
        preprocess={"a student with a long label": scaled, "teacher": centred},
    )
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- one line for a user's error


def test_examples_and_cli_programs_end_a_user_error_with_one_line(monkeypatch, capsys, tmp_path):
    example = os.path.join(ROOT, "examples", "teacher_from_run.py")
    monkeypatch.setattr(sys, "argv", ["teacher_from_run.py", "--run", str(tmp_path / "none")])
    monkeypatch.syspath_prepend(os.path.dirname(example))
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(example, run_name="__main__")
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("error: no trained run in") and "make demo" in err
    with pytest.raises(SystemExit) as exit_, one_line_errors(hint=" (run make demo first)"):
        raise KeyError("no 'group9' here\n(a second line)")
    err = capsys.readouterr().err
    assert err == "error: no 'group9' here (a second line) (run make demo first)\n"
    with pytest.raises(ZeroDivisionError), one_line_errors():  # a bug keeps its traceback
        _ = 1 / 0
    # the demo as the GPU wrapper starts it (its flags parsed by the demo), without the data
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_fmnist.py", "--workdir", str(tmp_path / "demo"),
         "--data_dir", str(tmp_path / "no_data"), "--train_size", "64", "--seeds", "1"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
    )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "dataset 'fashion_mnist' not found" in lines[0] and "apt-get install" in lines[0]


@pytest.mark.heavy
def test_gpu_check_smoke_records_every_section(tmp_path, capsys):
    """benchmarks/gpu_check.py --smoke: the GPU check's code on CPU with tiny shapes."""
    check = runpy.run_path(os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    assert check["main"](["--out", str(tmp_path), "--smoke"]) == 0
    record = json.load(open(tmp_path / "gpu_check.json"))
    assert record["environment"]["jax"] == jax.__version__ and record["smoke"] is True
    assert_bench_contract(record["at_step"]["float32"], "at", "wrn-tiny", batch=16)
    for dtype in ("float32", "bfloat16"):
        step = record["at_step"][dtype]
        assert step["dtype"] == dtype and step["images_per_s"] > 0
        assert step["compile_s"] > 0 and step["first_step_s"] > 0 and step["step_ms"] > 0
    assert set(record["torch_step"]) >= {
        "eager_float32", "eager_bfloat16", "compiled_float32", "compiled_bfloat16"
    }  # fmt: skip
    assert record["torch_step"]["compiled_bfloat16"]["compile"] == "eager"  # the smoke backend
    assert all(np.isfinite(r["loss"]) for k, r in record["torch_step"].items() if k[0] != "s")
    assert record["seeds"]["2"]["seeds"] == 2
    assert record["seeds"]["speedup_vs_one_seed"]["1"] == 1.0
    assert record["imagenet_step"]["student"] == "resnet-tiny"
    assert record["imagenet_step"]["dtype"] == "bfloat16"
    out = capsys.readouterr().out
    for section in ("environment:", "at_step:", "torch_step:", "seeds:", "imagenet_step:"):
        assert section in out
    # a section that cannot start in time is recorded as skipped, the file stays valid JSON
    assert check["main"](["--out", str(tmp_path / "late"), "--smoke", "--budget_s", "0"]) == 0
    late = json.load(open(tmp_path / "late" / "gpu_check.json"))
    assert late["torch_step"]["skipped"].startswith("past the time budget")


def test_gpu_fmnist_runs_the_demo_at_full_size():
    fmnist = runpy.run_path(os.path.join(ROOT, "benchmarks", "gpu_fmnist.py"))
    argv = fmnist["demo_argv"]("runs/x", "/data")
    assert argv == [
        "experiments.demo", "--workdir=runs/x", "--train_size=60000", "--test_size=10000",
        "--teacher_epochs=20", "--student_epochs=10", "--seeds=5", "--data_dir=/data",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="seeds must be an integer >= 1, got 0"):
        fmnist["demo_argv"]("runs/x", seeds=0)
