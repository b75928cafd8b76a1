"""Backward passes written out from their formulas.

Every gradient in this module is built from forward operations only
(`jax.numpy`, `lax.conv_general_dilated`, `lax.pad`, matrix products). No
function calls `jax.grad`, `jax.vjp`, `jax.jacobian` or `jax.linear_transpose`,
so automatic differentiation stays an independent oracle for the tests.

Conventions:

* Images are NHWC: (batch, height, width, channels).
* Convolution kernels are HWIO: (kernel height, kernel width, in channels,
  out channels).
* Dense weights are (in, out) and a dense layer computes `y = x @ w + b`.
* "Convolution" means cross-correlation, as computed by
  `lax.conv_general_dilated`, with padding "SAME" or "VALID" and one integer
  stride shared by both spatial axes.

Matrix products and convolutions run at `lax.Precision.HIGHEST`. These
functions are a reference, and the default precision on GPU and TPU rounds
float32 inputs to TF32 or bfloat16.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
_PADDING_MODES = ("SAME", "VALID")
_PRECISION = lax.Precision.HIGHEST


# ---------------------------------------------------------------------------
# Chain rule on a scalar expression
# ---------------------------------------------------------------------------


def chain_rule_example(x, y, z):
    """Compute f(x, y, z) = (x + y) * z and its gradient by the chain rule.

    The forward pass stores the intermediate q = x + y, then f = q * z. The
    backward pass starts from df/df = 1 and multiplies local derivatives:

        df/dq = z,  df/dz = q = x + y,
        df/dx = df/dq * dq/dx = z * 1,
        df/dy = df/dq * dq/dy = z * 1.

    Args:
      x, y, z: scalars or arrays of one common (broadcastable) shape.

    Returns:
      `(f, (df_dx, df_dy, df_dz))`, each of the broadcast shape of the inputs.
    """
    # Forward pass.
    q = x + y
    f = q * z

    # Backward pass. The upstream gradient of the output is 1.
    df_df = jnp.ones_like(f)
    df_dq = df_df * z
    df_dz = df_df * q

    # q = x + y passes its incoming gradient unchanged to both summands.
    df_dx = df_dq * 1.0
    df_dy = df_dq * 1.0

    return f, (df_dx, df_dy, df_dz)


# ---------------------------------------------------------------------------
# Dense layer
# ---------------------------------------------------------------------------


def _check_dense_shapes(x, w):
    if x.ndim != 2:
        raise ValueError(f"x must have shape (batch, in), got shape {x.shape}.")
    if w.ndim != 2:
        raise ValueError(f"w must have shape (in, out), got shape {w.shape}.")
    if x.shape[1] != w.shape[0]:
        raise ValueError(
            f"x has {x.shape[1]} input features but w has {w.shape[0]} rows. They must be equal."
        )


def dense_forward(x, w, b):
    """Apply a dense layer: y = x @ w + b.

    Args:
      x: inputs, shape (batch, in).
      w: weights, shape (in, out).
      b: bias, shape (out,).

    Returns:
      y, shape (batch, out).
    """
    _check_dense_shapes(x, w)
    return jnp.matmul(x, w, precision=_PRECISION) + b[None, :]


def dense_backward(x, w, grad_y):
    """Compute the gradients of a dense layer y = x @ w + b.

    With grad_y = dL/dy for a scalar loss L:

        grad_x = grad_y @ w^T            (batch, in)
        grad_w = x^T @ grad_y            (in, out)
        grad_b = sum over batch of grad_y  (out,)

    The bias is not an argument because y is affine in b with unit slope.

    Args:
      x: inputs of the forward pass, shape (batch, in).
      w: weights, shape (in, out).
      grad_y: gradient of the loss with respect to y, shape (batch, out).

    Returns:
      `(grad_x, grad_w, grad_b)` with shapes (batch, in), (in, out), (out,).
    """
    _check_dense_shapes(x, w)
    expected = (x.shape[0], w.shape[1])
    if grad_y.shape != expected:
        raise ValueError(f"grad_y must have shape (batch, out) = {expected}, got {grad_y.shape}.")

    grad_x = jnp.matmul(grad_y, w.T, precision=_PRECISION)
    grad_w = jnp.matmul(x.T, grad_y, precision=_PRECISION)

    # b is added to every row of the batch, so its gradient sums over rows.
    grad_b = jnp.sum(grad_y, axis=0)

    return grad_x, grad_w, grad_b


# ---------------------------------------------------------------------------
# Sigmoid with binary cross-entropy
# ---------------------------------------------------------------------------


def sigmoid_bce(logits, labels):
    """Compute the mean binary cross-entropy of sigmoid(logits) against labels.

    For one element with logit z and label y in [0, 1]:

        l(z, y) = -y log(sigmoid(z)) - (1 - y) log(1 - sigmoid(z))
                = max(z, 0) - z y + log(1 + exp(-|z|)).

    The second form never exponentiates a positive number, so it stays finite
    for large |z|. The loss is the mean over all elements.

    Args:
      logits: array of any shape.
      labels: array of the same shape, with values in {0, 1} or probabilities.

    Returns:
      The scalar loss.
    """
    _check_same_shape(logits, labels)
    per_element = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return jnp.mean(per_element)


def sigmoid_bce_backward(logits, labels):
    """Compute the gradient of `sigmoid_bce` with respect to the logits.

    The derivative of the per-element loss simplifies to
    dl/dz = sigmoid(z) - y. The loss averages over all N = logits.size
    elements, so

        dL/dz = (sigmoid(z) - y) / N.

    Args:
      logits: array of any shape.
      labels: array of the same shape, with values in {0, 1} or probabilities.

    Returns:
      The gradient, same shape as `logits`.
    """
    _check_same_shape(logits, labels)
    count = logits.size
    return (jax.nn.sigmoid(logits) - labels) / count


def _check_same_shape(logits, labels):
    if logits.shape != labels.shape:
        raise ValueError(
            f"labels must have the shape of logits {logits.shape}, got {labels.shape}."
        )


# ---------------------------------------------------------------------------
# Gradient descent
# ---------------------------------------------------------------------------


def gradient_descent_update(params, grads, learning_rate):
    """Take one gradient descent step: w <- w - learning_rate * g.

    Args:
      params: pytree of arrays.
      grads: pytree of the same structure and leaf shapes as `params`.
      learning_rate: scalar step size.

    Returns:
      A new pytree of the structure of `params`.
    """
    return jax.tree.map(lambda w, g: w - learning_rate * g, params, grads)


# ---------------------------------------------------------------------------
# 2-D convolution
# ---------------------------------------------------------------------------


def _check_conv_args(x, w, stride, padding):
    if padding not in _PADDING_MODES:
        raise ValueError(f"padding must be one of {_PADDING_MODES}, got {padding!r}.")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int (1, 2, ...), got {stride!r}.")
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC with 4 dimensions, got shape {x.shape}.")
    if w.ndim != 4:
        raise ValueError(f"w must be HWIO with 4 dimensions, got shape {w.shape}.")
    if x.shape[3] != w.shape[2]:
        raise ValueError(
            f"x has {x.shape[3]} in channels (last axis) but w has {w.shape[2]} "
            "(axis 2 of HWIO). They must be equal."
        )


def _padding_pair(size, kernel_size, stride, padding):
    """Return the (low, high) padding of one spatial axis.

    "VALID" pads nothing. "SAME" follows XLA: the output has ceil(size / stride)
    positions, total = max((ceil(size / stride) - 1) * stride + kernel_size - size, 0),
    low = total // 2 and high = total - low.
    """
    if padding == "VALID":
        return 0, 0

    out_size = math.ceil(size / stride)
    total = max((out_size - 1) * stride + kernel_size - size, 0)
    low = total // 2
    return low, total - low


def _conv_geometry(x_shape, w_shape, stride, padding):
    """Return the explicit padding and output size of both spatial axes.

    Returns:
      `(pads, out_sizes)`: pads is ((low_h, high_h), (low_w, high_w)) and
      out_sizes is (out_height, out_width).
    """
    pads = []
    out_sizes = []
    for size, kernel_size in zip(x_shape[1:3], w_shape[0:2], strict=True):
        low, high = _padding_pair(size, kernel_size, stride, padding)
        padded = size + low + high
        if padded < kernel_size:
            raise ValueError(
                f"kernel of size {kernel_size} does not fit an input of size {size} "
                f"with {padding} padding (padded size {padded})."
            )
        pads.append((low, high))
        out_sizes.append((padded - kernel_size) // stride + 1)
    return tuple(pads), tuple(out_sizes)


def _correlate(lhs, rhs, rhs_dilation=(1, 1)):
    """Cross-correlate NHWC `lhs` with HWIO `rhs`, stride 1, no padding."""
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides=(1, 1),
        padding="VALID",
        rhs_dilation=rhs_dilation,
        dimension_numbers=_DIMENSION_NUMBERS,
        precision=_PRECISION,
    )


def conv2d_forward(x, w, b=None, stride=1, padding="VALID"):
    """Apply a 2-D cross-correlation with an optional bias.

        y[n, p, q, o] = sum_{i, j, c} x_pad[n, p s + i, q s + j, c] w[i, j, c, o] + b[o]

    where s is the stride and x_pad is x with the padding of `padding`.

    Args:
      x: inputs, shape (batch, height, width, in_channels).
      w: kernel, shape (kernel_height, kernel_width, in_channels, out_channels).
      b: optional bias, shape (out_channels,).
      stride: positive int, the same for height and width.
      padding: "SAME" or "VALID".

    Returns:
      y, shape (batch, out_height, out_width, out_channels).

    Raises:
      ValueError: on an unknown padding, a stride that is not a positive int,
        mismatched channel counts or a kernel larger than the padded input.
    """
    _check_conv_args(x, w, stride, padding)
    pads, _ = _conv_geometry(x.shape, w.shape, stride, padding)

    y = lax.conv_general_dilated(
        x,
        w,
        window_strides=(stride, stride),
        padding=pads,
        dimension_numbers=_DIMENSION_NUMBERS,
        precision=_PRECISION,
    )

    if b is not None:
        y = y + b[None, None, None, :]
    return y


def conv2d_backward(x, w, grad_y, stride=1, padding="VALID"):
    """Compute the gradients of `conv2d_forward` from the formulas.

    With s the stride, grad_y = dL/dy and x_pad the padded input:

    * Kernel gradient: grad_w[i, j, c, o] = sum_{n, p, q} x_pad[n, p s + i, q s + j, c]
      grad_y[n, p, q, o]. This is a cross-correlation of x_pad with grad_y dilated
      by s, with batch as the contracted axis.
    * Input gradient: the full convolution of grad_y, dilated by s, with the
      kernel rotated by 180 degrees (both spatial axes flipped, in and out
      channels swapped). The result covers x_pad, so the forward padding is
      cropped off. When the strided windows stop before the end of x_pad
      (VALID with leftover rows or columns), those positions get zero gradient.
    * Bias gradient: grad_b[o] = sum_{n, p, q} grad_y[n, p, q, o].

    Args:
      x: inputs of the forward pass, shape (batch, height, width, in_channels).
      w: kernel, shape (kernel_height, kernel_width, in_channels, out_channels).
      grad_y: gradient of the loss with respect to the output, shape
        (batch, out_height, out_width, out_channels).
      stride: positive int used by the forward pass.
      padding: "SAME" or "VALID", as used by the forward pass.

    Returns:
      `(grad_x, grad_w, grad_b)` with the shapes of x, w and (out_channels,).

    Raises:
      ValueError: on the invalid arguments listed for `conv2d_forward`, or a
        grad_y whose shape differs from the forward output.
    """
    _check_conv_args(x, w, stride, padding)
    pads, out_sizes = _conv_geometry(x.shape, w.shape, stride, padding)
    expected = (x.shape[0], *out_sizes, w.shape[3])
    if grad_y.shape != expected:
        raise ValueError(
            f"grad_y must have the forward output shape {expected}, got {grad_y.shape}."
        )

    grad_w = _conv2d_kernel_grad(x, w.shape, grad_y, stride, pads)
    grad_x = _conv2d_input_grad(x.shape, w, grad_y, stride, pads)
    grad_b = jnp.sum(grad_y, axis=(0, 1, 2))

    return grad_x, grad_w, grad_b


def _dilate(grad_y, stride):
    """Insert stride - 1 zeros between neighbouring rows and columns of grad_y.

    Output position p of a strided conv reads input rows p s .. p s + k - 1, so
    placing grad_y[p] at row p s turns the strided conv into a stride-1 one.
    Shape (n, h, w, c) becomes (n, (h - 1) s + 1, (w - 1) s + 1, c).
    """
    zero = jnp.zeros((), grad_y.dtype)
    interior = stride - 1
    config = ((0, 0, 0), (0, 0, interior), (0, 0, interior), (0, 0, 0))
    return lax.pad(grad_y, zero, config)


def _conv2d_kernel_grad(x, w_shape, grad_y, stride, pads):
    """Correlate the padded input with the dilated output gradient.

    Returns an array of shape `w_shape` (HWIO).
    """
    kernel_h, kernel_w = w_shape[0], w_shape[1]
    x_pad = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))

    # Contract over the batch: treat in channels as the batch axis of the
    # correlation and the batch as its feature axis.
    lhs = jnp.transpose(x_pad, (3, 1, 2, 0))  # (C, Hp, Wp, N)
    rhs = jnp.transpose(grad_y, (1, 2, 0, 3))  # (Ho, Wo, N, O)

    # Dilating the "kernel" grad_y by the stride gives the p s + i indexing.
    grad_w = _correlate(lhs, rhs, rhs_dilation=(stride, stride))  # (C, >=kh, >=kw, O)

    # Leftover rows or columns of x_pad that no window reached yield extra
    # offsets beyond the kernel size. They are not kernel taps, so drop them.
    grad_w = grad_w[:, :kernel_h, :kernel_w, :]

    return jnp.transpose(grad_w, (1, 2, 0, 3))


def _conv2d_input_grad(x_shape, w, grad_y, stride, pads):
    """Fully convolve the dilated output gradient with the rotated kernel.

    Returns an array of shape `x_shape` (NHWC).
    """
    kernel_h, kernel_w = w.shape[0], w.shape[1]
    height, width = x_shape[1], x_shape[2]

    # Rotate by 180 degrees and swap in/out channels: (kh, kw, O, C).
    w_rotated = jnp.transpose(jnp.flip(w, axis=(0, 1)), (0, 1, 3, 2))

    # A full convolution pads by kernel size - 1 on every side, so each input
    # position receives gradient from every output whose window covered it.
    dilated = _dilate(grad_y, stride)
    full_pads = ((0, 0), (kernel_h - 1, kernel_h - 1), (kernel_w - 1, kernel_w - 1), (0, 0))
    grad_x_pad = _correlate(jnp.pad(dilated, full_pads), w_rotated)

    # The result covers x_pad up to the last row and column any window
    # reached. Rows and columns past that got no gradient, so pad with zeros.
    padded_h = height + pads[0][0] + pads[0][1]
    padded_w = width + pads[1][0] + pads[1][1]
    leftover_h = padded_h - grad_x_pad.shape[1]
    leftover_w = padded_w - grad_x_pad.shape[2]
    grad_x_pad = jnp.pad(grad_x_pad, ((0, 0), (0, leftover_h), (0, leftover_w), (0, 0)))

    # Crop off the forward padding because it is not part of x.
    low_h, low_w = pads[0][0], pads[1][0]
    return grad_x_pad[:, low_h : low_h + height, low_w : low_w + width, :]
