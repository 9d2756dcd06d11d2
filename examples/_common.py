"""What the examples share and at_jax does not provide: data and a plain optax loop."""

import jax
import numpy as np
import optax


def fashion_mnist(n_train=4096, n_test=1000):
    """Fashion-MNIST in [0, 1] (28x28x1) when installed (Debian: apt-get install
    dataset-fashion-mnist; or set AT_JAX_DATA_DIR to the IDX files), else random stand-ins."""
    from at_jax.data import load_dataset

    try:
        d = load_dataset("fashion_mnist", train_size=n_train, test_size=n_test)
        return d.train_images / 255.0, d.train_labels, d.test_images / 255.0, d.test_labels
    except FileNotFoundError:
        print("Fashion-MNIST not found: random data stands in (the numbers mean nothing)")
        rng = np.random.default_rng(0)
        images = rng.random((n_train + n_test, 28, 28, 1))
        labels = rng.integers(0, 10, n_train + n_test)
        return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]


def fit(loss_fn, params, x, y, steps, batch=64, lr=0.05):
    """SGD with momentum on ``loss_fn(params, x_batch, y_batch)`` for ``steps`` steps."""
    tx = optax.sgd(lr, momentum=0.9)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    for i in range(steps):
        idx = np.random.default_rng(i).integers(0, len(y), batch)
        params, opt_state, loss = step(params, opt_state, x[idx], y[idx])
    print(f"  last train loss {float(loss):.3f}")
    return params


def report_test_error(name, logits_fn, x, y):
    """Print (and return) the top-1 error in % of ``logits_fn`` (jitted) on ``x``."""
    error = 100.0 * float(np.mean(np.argmax(jax.jit(logits_fn)(x), -1) != y))
    print(f"{name} test error {error:.2f}%")
    return error
