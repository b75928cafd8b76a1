"""Losses against NumPy formulas, including extreme logits."""

import jax.numpy as jnp
import numpy as np
import pytest

from bpalt import losses

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(0.0, 3.0, (6, 4)).astype(np.float32)
LABELS = np.array([0, 3, 1, 2, 3, 0], np.int32)
ONE_HOT = np.eye(4, dtype=np.float32)[LABELS]


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _naive_bce(z, y):
    p = 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))
    return np.mean(-y * np.log(p) - (1 - y) * np.log(1 - p))


def test_bce_equals_naive_formula():
    targets = RNG.uniform(0.0, 1.0, LOGITS.shape).astype(np.float32)
    value = losses.binary_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(targets))
    assert float(value) == pytest.approx(_naive_bce(LOGITS, targets), rel=1e-5)


def test_bce_integer_labels_are_one_hot():
    from_int = losses.binary_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(LABELS))
    assert float(from_int) == pytest.approx(_naive_bce(LOGITS, ONE_HOT), rel=1e-5)


@pytest.mark.parametrize("label", [0.0, 1.0])
@pytest.mark.parametrize("logit", [100.0, -100.0])
def test_bce_extreme_logits(logit, label):
    # Closed form: loss = log(1 + exp(-z)) for y = 1 and log(1 + exp(z)) for y = 0, which is
    # about |z| when the sign is wrong and exp(-|z|) (3.7e-44) when it is right.
    value = losses.binary_cross_entropy(jnp.array([[logit]]), jnp.array([[label]]))
    signed = -logit if label == 1.0 else logit
    expected = np.logaddexp(0.0, signed)
    assert np.isfinite(float(value))
    assert float(value) == pytest.approx(expected, rel=1e-6, abs=1e-30)


def test_softmax_ce_equals_numpy():
    value = losses.softmax_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(LABELS))
    expected = -np.mean(_log_softmax(LOGITS)[np.arange(len(LABELS)), LABELS])
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_softmax_ce_integer_equals_one_hot():
    from_int = losses.softmax_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(LABELS))
    from_one_hot = losses.softmax_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(ONE_HOT))
    assert float(from_int) == pytest.approx(float(from_one_hot), rel=1e-6)


def test_softmax_ce_soft_targets():
    targets = RNG.dirichlet(np.ones(4), size=LOGITS.shape[0]).astype(np.float32)
    value = losses.softmax_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(targets))
    expected = -np.mean(np.sum(targets * _log_softmax(LOGITS), axis=-1))
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_softmax_ce_large_logits_finite():
    logits = jnp.array([[1000.0, -1000.0, 0.0]])
    value = losses.softmax_cross_entropy(logits, jnp.array([1]))
    assert float(value) == pytest.approx(2000.0, rel=1e-6)


def test_mse_equals_formula():
    targets = RNG.normal(size=LOGITS.shape).astype(np.float32)
    value = losses.mean_squared_error(jnp.asarray(LOGITS), jnp.asarray(targets))
    expected = 0.5 * np.mean(np.sum((LOGITS.astype(np.float64) - targets) ** 2, axis=1))
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_mse_integer_labels_are_one_hot():
    value = losses.mean_squared_error(jnp.asarray(LOGITS), jnp.asarray(LABELS))
    expected = 0.5 * np.mean(np.sum((LOGITS.astype(np.float64) - ONE_HOT) ** 2, axis=1))
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_mismatched_labels_raise():
    with pytest.raises(ValueError, match=r"labels of shape \(6, 4, 1\)"):
        losses.mean_squared_error(jnp.asarray(LOGITS), jnp.zeros((6, 4, 1)))


@pytest.mark.parametrize(
    "name,function",
    [
        ("cross_entropy", losses.softmax_cross_entropy),
        ("binary_cross_entropy", losses.binary_cross_entropy),
        ("mse", losses.mean_squared_error),
    ],
)
def test_get_by_name(name, function):
    assert losses.get(name) is function


def test_get_unknown_name_raises():
    with pytest.raises(ValueError, match="unknown loss 'hinge'; accepted: binary_cross_entropy"):
        losses.get("hinge")


@pytest.mark.parametrize("loss", [losses.softmax_cross_entropy, losses.binary_cross_entropy,
                                  losses.mean_squared_error])
@pytest.mark.parametrize("shape", [(64, 1), (32,), (64, 5)])
def test_labels_of_another_shape_rejected(loss, shape):
    logits = jnp.zeros((64, 10))
    labels = jnp.zeros(shape, jnp.int32)

    with pytest.raises(ValueError, match=rf"labels of shape \({shape[0]},"):
        loss(logits, labels)


@pytest.mark.parametrize(
    "loss", [losses.softmax_cross_entropy, losses.binary_cross_entropy, losses.mean_squared_error]
)
@pytest.mark.parametrize("bad_label", [4, -1, 100])
def test_label_outside_classes_gives_nan(loss, bad_label):
    labels = LABELS.copy()
    labels[2] = bad_label

    assert np.isnan(float(loss(LOGITS, labels)))
    # The same examples with valid labels keep their finite value.
    assert np.isfinite(float(loss(LOGITS, LABELS)))


@pytest.mark.parametrize(
    "loss", [losses.softmax_cross_entropy, losses.binary_cross_entropy, losses.mean_squared_error]
)
def test_integer_labels_equal_one_hot(loss):
    np.testing.assert_allclose(loss(LOGITS, LABELS), loss(LOGITS, ONE_HOT), rtol=1e-6)


@pytest.mark.parametrize("value", [["mse"], 3, None])
def test_get_rejects_non_loss_value(value):
    with pytest.raises(ValueError, match=r"loss must be a name .* or a callable"):
        losses.get(value)


@pytest.mark.parametrize(
    "loss", [losses.softmax_cross_entropy, losses.binary_cross_entropy, losses.mean_squared_error]
)
@pytest.mark.parametrize(
    ("classes", "dtype"), [(256, np.uint8), (128, np.int8), (65536, np.uint16)]
)
def test_small_label_dtype_no_overflow(loss, classes, dtype):
    logits = np.zeros((3, classes), np.float32)
    labels = np.array([0, 1, np.iinfo(dtype).max], dtype)
    expected = loss(logits, labels.astype(np.int32))

    assert np.isfinite(float(expected))
    np.testing.assert_allclose(loss(logits, labels), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "loss", [losses.softmax_cross_entropy, losses.binary_cross_entropy, losses.mean_squared_error]
)
def test_fractional_float_label_gives_nan(loss):
    whole = LABELS.astype(np.float32)
    np.testing.assert_allclose(loss(LOGITS, whole), loss(LOGITS, LABELS), rtol=1e-6)
    whole[2] = 2.5
    assert np.isnan(float(loss(LOGITS, whole)))


def test_get_rejects_wrong_arity_callable():
    with pytest.raises(ValueError, match=r"a loss is called as loss\(logits, labels\), but"):
        losses.get(lambda logits: logits.sum())
    assert losses.get(losses.mean_squared_error) is losses.mean_squared_error
