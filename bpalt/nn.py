"""Pure functional layers and the ``Network`` of blocks.

A layer is a ``Layer(init, apply, feedback_apply)`` of pure functions, in the style of
``jax.example_libraries.stax``:

- ``init(key, input_shape) -> (output_shape, params)``; shapes exclude the batch axis.
- ``apply(params, x) -> y``; ``x`` has a leading batch axis and images are NHWC.
- ``feedback_apply(params, feedback, x) -> y``: the same forward pass, but a linear layer
  sends its input gradient through ``feedback`` (a pytree shaped like ``params``) instead of
  through its own weights. Feedback alignment and its variants use it; layers without
  weights ignore ``feedback``.

Parametric layers (``dense``, ``conv2d``) are linear in their input, and nonlinearities are
layers of their own, so that a rule can change how the error crosses each linear map without
touching the activations.

A ``Network`` is a sequence of blocks, each block a layer (usually ``serial(conv2d(...),
relu, max_pool(...))``). Its params are a tuple with one entry per block; that tuple is the
parameter pytree every update rule reads and returns. ``serial`` runs a convolution with a
large kernel, its activations and a non-overlapping pool as one computation on the pool's
grid (``_conv_on_pool_grid``), with the params and gradients of the layers one by one.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bpalt import initializers

Shape = tuple[int, ...]
Params = Any


class Layer(NamedTuple):
    """A layer as a pair of pure functions plus its feedback-alignment forward pass.

    Attributes:
        init: ``(key, input_shape) -> (output_shape, params)``.
        apply: ``(params, x) -> y`` with a leading batch axis on ``x`` and ``y``.
        feedback_apply: ``(params, feedback, x) -> y``; the forward pass equals ``apply`` and
            the gradient sent to ``x`` uses the weights in ``feedback``.
    """

    init: Callable[[jax.Array, Shape], tuple[Shape, Params]]
    apply: Callable[[Params, jax.Array], jax.Array]
    feedback_apply: Callable[[Params, Params, jax.Array], jax.Array]


MAX_SIZE = 2**63 - 1
"""Largest layer size or window accepted: XLA stores array dimensions as signed 64-bit
integers."""


def _is_count(value) -> bool:
    """Return whether ``value`` is a positive integer (NumPy's included, ``True`` not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _count(name: str, value) -> int:
    """Return ``value`` as a Python int, or raise ``ValueError`` unless it is a positive integer.

    The conversion matters for NumPy integers: a small type such as ``uint8`` would
    overflow in the shape arithmetic.
    """
    if not _is_count(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value > MAX_SIZE:
        raise ValueError(
            f"{name} must be at most 2**63 - 1, the largest array dimension XLA supports, "
            f"got {value!r}"
        )
    return int(value)


def _layer_input_shape(layer: str, input_shape, expected: str) -> tuple[int, ...]:
    """Return ``input_shape`` as Python ints, or raise unless its sizes are positive integers.

    ``expected`` names the shape the layer takes, such as ``"(height, width, channels)"``;
    its number of entries is the rank the layer needs.
    """
    rank = len([name for name in expected.strip("()").split(",") if name.strip()])
    shape = tuple(input_shape)
    if len(shape) != rank or not all(_is_count(d) for d in shape):
        raise ValueError(
            f"{layer} takes an input shape {expected} of positive integers, got {shape}"
        )
    return tuple(int(d) for d in shape)


def _check_weight_size(layer: str, shape: tuple[int, ...]) -> None:
    """Raise unless a weight array of ``shape`` has at most ``MAX_SIZE`` entries.

    Each size alone may be valid while their product is not; JAX's random number
    generators then fail with a message that names no layer.
    """
    entries = math.prod(shape)
    if entries > MAX_SIZE:
        raise ValueError(
            f"{layer} weights of shape {shape} would have {entries} entries, more than "
            f"2**63 - 1, the largest array XLA supports; use fewer features"
        )


def _parameter_free(
    fn: Callable[[jax.Array], jax.Array], shape_fn=None, *, elementwise: bool = False
) -> Layer:
    """Build a layer with no params (``()``) from an elementwise or shape function.

    ``elementwise=True`` marks ``fn`` as acting on each entry alone, which lets ``serial``
    fuse it between a convolution and a pool (see ``serial``).
    """

    def init(key, input_shape):
        del key
        output_shape = tuple(input_shape) if shape_fn is None else shape_fn(tuple(input_shape))
        return output_shape, ()

    def apply(params, x):
        del params
        return fn(x)

    def feedback_apply(params, feedback, x):
        del params, feedback
        return fn(x)

    if elementwise:
        apply._bpalt_elementwise = feedback_apply._bpalt_elementwise = fn
    return Layer(init, apply, feedback_apply)


# --- Linear maps with a separate feedback path -------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def feedback_linear(linear_fn, x, w, feedback):
    """Compute ``linear_fn(x, w)``, sending the input gradient through ``feedback``.

    ``linear_fn(x, w)`` must be linear in ``x`` (a dense or convolution map). In the
    backward pass the weight gradient is the true one, ``vjp_w linear_fn(x, .)(delta)``,
    and the input receives ``vjp_x linear_fn(., feedback)(delta)``: ``delta @ B.T`` for a
    dense layer and the transposed convolution with kernel ``B`` for a convolution
    (Lillicrap et al. 2016, arXiv:1411.0247). With ``feedback = w`` this is backprop.
    ``feedback`` itself receives a zero gradient.
    """
    return linear_fn(x, w)


def _feedback_linear_fwd(linear_fn, x, w, feedback):
    return linear_fn(x, w), (x, w, feedback)


def _feedback_linear_bwd(linear_fn, residuals, delta):
    x, w, feedback = residuals

    _, weight_vjp = jax.vjp(lambda w_: linear_fn(x, w_), w)
    (grad_w,) = weight_vjp(delta)

    _, input_vjp = jax.vjp(lambda x_: linear_fn(x_, feedback), x)
    (grad_x,) = input_vjp(delta)

    return grad_x, grad_w, jnp.zeros_like(feedback)


feedback_linear.defvjp(_feedback_linear_fwd, _feedback_linear_bwd)


def _matmul(x, w):
    if x.shape[-1:] != w.shape[:1]:
        raise ValueError(
            f"dense weights {tuple(w.shape)} take a batch of shape (batch, {w.shape[0]}), got "
            f"input shape {tuple(x.shape)}. Initialise the layer with the input's shape, and "
            "put flatten before it for images"
        )
    return x @ w


def _linear_layer(linear_fn, init_fn) -> Layer:
    """Wrap a linear map ``linear_fn(x, w)`` with an optional bias into a ``Layer``."""

    def add_bias(params, y):
        if "b" not in params:
            return y
        # An explicit leading axis per batch and spatial dimension keeps the bias add valid
        # under jax_numpy_rank_promotion="raise".
        return y + params["b"].reshape((1,) * (y.ndim - 1) + (-1,))

    def apply(params, x):
        return add_bias(params, linear_fn(x, params["w"]))

    def feedback_apply(params, feedback, x):
        return add_bias(params, feedback_linear(linear_fn, x, params["w"], feedback["w"]))

    return Layer(init_fn, apply, feedback_apply)


def dense(
    features: int,
    *,
    use_bias: bool = True,
    w_init: initializers.Initializer | str = "he_normal",
    b_init: initializers.Initializer | str = "zeros",
) -> Layer:
    """Fully connected layer ``y = x @ w + b``.

    Shapes: ``x`` (batch, in), ``w`` (in, features), ``b`` (features,), ``y`` (batch,
    features). Flatten images with ``flatten`` first.
    """
    features = _count("dense features", features)
    w_init, b_init = initializers.get(w_init), initializers.get(b_init)

    def init(key, input_shape):
        if len(input_shape) != 1:
            raise ValueError(
                f"dense expects a flat input (features,), got input shape {tuple(input_shape)}; "
                "put flatten before it"
            )
        (fan_in,) = _layer_input_shape("dense", input_shape, "(features,)")
        _check_weight_size("dense", (fan_in, features))
        w_key, b_key = jax.random.split(key)
        params = {"w": w_init(w_key, (fan_in, features))}
        if use_bias:
            params["b"] = b_init(b_key, (features,))
        return (features,), params

    return _linear_layer(_matmul, init)


# --- Convolution ---------------------------------------------------------------------------


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA's SAME padding: output ceil(size / stride), extra row at the high end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_output_size(size: int, kernel: int, stride: int, padding: str) -> int:
    """Output length of one spatial axis."""
    if padding == "SAME":
        return -(-size // stride)
    return (size - kernel) // stride + 1


def _check_input(x, w, padding: str) -> None:
    """Raise unless ``x`` is an NHWC batch with as many channels as the HWIO kernel ``w`` takes,
    and, with VALID padding, at least as high and wide as the kernel."""
    if x.ndim != 4:
        raise ValueError(
            f"conv2d expects a batch of images (batch, height, width, channels), got input "
            f"shape {tuple(x.shape)}"
        )
    if min(x.shape[1:3]) < 1:
        raise ValueError(
            f"invalid input shape {tuple(x.shape)}: conv2d needs images of at least 1 x 1 "
            "pixels"
        )
    if x.shape[-1] != w.shape[2]:
        raise ValueError(
            f"conv2d kernel {tuple(w.shape)} has in_channels={w.shape[2]}, but the input "
            f"{tuple(x.shape)} has {x.shape[-1]} channels. Initialise the layer with the "
            "input's shape"
        )
    kh, kw = w.shape[:2]
    if padding == "VALID" and (x.shape[1] < kh or x.shape[2] < kw):
        raise ValueError(
            f"conv2d kernel {kh}x{kw} with VALID padding does not fit input "
            f"{x.shape[1]}x{x.shape[2]} (input shape {tuple(x.shape)}); use padding='SAME' or "
            "an input at least as large as the kernel"
        )


def _conv_xla(x, w, *, stride, padding):
    _check_input(x, w, padding)
    return lax.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _window(x, axis: int, start: int, size: int, stride: int):
    """``size`` entries of ``x`` along ``axis``, from ``start``, every ``stride``-th."""
    return lax.slice_in_dim(x, start, start + (size - 1) * stride + 1, stride, axis)


def _stack(arrays, axis: int):
    """``jnp.stack`` by reshapes and one ``lax.concatenate``.

    Under ``vmap`` (seeds), ``jnp.stack`` placed the new axis before the mapped one, so XLA
    transposed the whole result to feed the matrix product. Reshapes keep the mapped axis
    first: three seeds of LeNet's first-layer weight gradient took 5 ms instead of 13 ms.
    """
    return lax.concatenate([a.reshape(*a.shape[:axis], 1, *a.shape[axis:]) for a in arrays], axis)


def _patches(x, kh: int, kw: int, stride: int, out_h: int, out_w: int):
    """Kernel-sized windows, offsets last: (n, h, w, c) -> (n, out_h, out_w, kh * kw * c).

    Built in two stages, the row offsets and then the column offsets, each one stack of
    strided slices. The last axis runs over (row, column, channel), like a reshaped HWIO
    kernel, and the transpose (the input gradient) is two stages of padded sums. On XLA:CPU,
    for LeNet's second layer at batch 128, two stages took 0.48 ms where one concatenate of
    kh * kw slices took 0.78 ms. The two-stage input gradient took 0.8 ms against 1.5 ms.
    """
    rows = _stack([_window(x, 1, i, out_h, stride) for i in range(kh)], axis=3)
    patches = _stack([_window(rows, 2, j, out_w, stride) for j in range(kw)], axis=4)
    return patches.reshape(*patches.shape[:3], -1)


def _patches_offsets_first(x, kh: int, kw: int, stride: int, out_h: int, out_w: int):
    """Kernel-sized windows, offsets first: (n, h, w, c) -> (kh * kw * c, n * out_h * out_w).

    The layout in which the weight gradient ``patches @ delta`` is a plain matrix product.
    """
    channels = jnp.moveaxis(x, 3, 0)
    columns = _stack([_window(channels, 3, j, out_w, stride) for j in range(kw)], axis=0)
    patches = _stack([_window(columns, 3, i, out_h, stride) for i in range(kh)], axis=0)
    return patches.reshape(kh * kw * x.shape[3], -1)


def _conv_by_patches(x, w, stride: int, out_h: int, out_w: int):
    """VALID convolution as patches (n, out_h, out_w, kh*kw*in) @ kernel (kh*kw*in, out)."""
    kh, kw, _, cout = w.shape
    return _patches(x, kh, kw, stride, out_h, out_w) @ w.reshape(-1, cout)


def _conv_by_transposed_patches(x, w, stride: int, out_h: int, out_w: int):
    """VALID convolution as (kh*kw*in, m)^T @ kernel (kh*kw*in, out), m = n * out_h * out_w.

    Used for the kernel's tangent: its transpose is ``patches @ delta``, the weight gradient
    as one matrix product without a transposed operand.
    """
    kh, kw, _, cout = w.shape
    patches = _patches_offsets_first(x, kh, kw, stride, out_h, out_w)
    y = lax.dot_general(patches, w.reshape(-1, cout), (((0,), (0,)), ((), ())))
    return y.reshape(x.shape[0], out_h, out_w, cout)


ROW_BAND_MIN_KERNEL_WIDTH = 5
"""Narrowest kernel whose weight gradient uses ``_conv_by_row_band`` (one channel, stride 1).

The figures below were measured before ``serial`` fused LeNet's convolutions with their
pools. A fused convolution has ``P * P`` input channels and takes the patches path.

In one process, with alternating rounds, LeNet's backprop step at batch 128 (5 x 5 kernel,
28 columns) took 0.91 to 0.96 of the patches step with the row band in its first layer. The
digits CNN's step (3 x 3 kernel, 10 padded columns) took 1.04, LeNet's six-channel second
layer made its step 8 % slower, and ``patch_cnn``'s 8 x 8 kernel at stride 4 1.00 to 1.02.
"""

ROW_BAND_MAX_WIDTH_RATIO = 6
"""Widest input, in kernel widths, whose weight gradient uses ``_conv_by_row_band``.

The band multiplies the arithmetic by ``width / kw``. For one 5 x 5 layer's weight
gradient, the band took 2 to 3 times the patches' time on 64 columns (12.8 kernel widths)
and 16 times on 512 columns.
"""


def _uses_row_band(width: int, w_shape, stride: int) -> bool:
    """Return whether the kernel tangent of a VALID convolution takes ``_conv_by_row_band``."""
    _, kw, cin, _ = w_shape
    return (
        cin == 1
        and stride == 1
        and ROW_BAND_MIN_KERNEL_WIDTH <= kw
        and width <= ROW_BAND_MAX_WIDTH_RATIO * kw
    )


def _column_band(width: int, out_w: int, kw: int, stride: int) -> np.ndarray:
    """Build the 0/1 selector ``S`` (width, out_w, kw), 1 where column = ``j * stride + b``."""
    selector = np.zeros((width, out_w, kw), np.float32)
    for j in range(out_w):
        selector[j * stride + np.arange(kw), j, np.arange(kw)] = 1.0
    return selector


def _conv_by_row_band(x, w, stride: int, out_h: int, out_w: int):
    """Compute a VALID convolution as stacked input rows times a banded kernel matrix.

    Only the kernel's row offsets are stacked: ``rows`` (kh * width * in, n * out_h), offsets
    first. The column offsets sit in the band (kh * width * in, out_w * out), whose column
    ``(j, o)`` contains kernel ``o`` at input columns ``j * stride`` to
    ``j * stride + kw - 1`` and zeros elsewhere. The product does ``width / kw`` times the
    arithmetic of patches @ kernel, but copies the input ``kh`` times instead of
    ``kh * kw`` times.

    Used for the kernel tangent of a one-channel input at stride 1: its transpose, the
    weight gradient, is the plain product ``rows @ delta`` followed by a sum along the
    band's diagonals.
    """
    kh, kw, cin, cout = w.shape
    n, _, width, _ = x.shape
    columns_first = jnp.transpose(x, (2, 3, 0, 1))
    rows = _stack([_window(columns_first, 3, i, out_h, stride) for i in range(kh)], axis=0)
    rows = rows.reshape(kh * width * cin, n * out_h)
    selector = jnp.asarray(_column_band(width, out_w, kw, stride), w.dtype)
    band = jnp.einsum("cjb,abio->acijo", selector, w).reshape(kh * width * cin, out_w * cout)
    y = lax.dot_general(rows, band, (((0,), (0,)), ((), ())))
    return y.reshape(n, out_h, out_w, cout)


def _conv_by_shifts(x, w, stride: int, out_h: int, out_w: int):
    """VALID convolution of a one-channel input as a sum of shifted copies times kernel rows.

    With one input channel, a patches matrix has one column per kernel offset, and its
    product is a thin (m, kh*kw) @ (kh*kw, out). XLA fuses ``kh * kw`` broadcast
    multiply-adds into one loop instead, which took 0.3 ms against 2 to 5 ms for LeNet's
    first layer at batch 128.
    """
    kh, kw, _, _ = w.shape
    y = 0.0
    for i in range(kh):
        for j in range(kw):
            shifted = _window(_window(x, 1, i, out_h, stride), 2, j, out_w, stride)
            y = y + shifted * w[i, j].reshape(1, 1, 1, -1)
    return y


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _conv_valid(x, w, stride, out_h, out_w):
    """VALID convolution (n, h, w, in) x (kh, kw, in, out) -> (n, out_h, out_w, out).

    The forward pass and the two tangents each use the formulation that ran fastest on
    XLA:CPU; all three compute the same bilinear map, so the derivatives are exact:

    - forward: shifted copies for one input channel, patches @ kernel otherwise;
    - kernel tangent: stacked rows times a banded kernel matrix where ``_uses_row_band``
      allows it (one input channel, stride 1, a kernel at least
      ``ROW_BAND_MIN_KERNEL_WIDTH`` wide, an input at most ``ROW_BAND_MAX_WIDTH_RATIO``
      kernels wide), transposed patches otherwise. The transpose of either, the weight
      gradient, is one matrix product (the band's followed by a sum along its diagonals);
    - input tangent: patches of the tangent @ kernel, whose transpose is the input
      gradient as two stages of padded sums.

    A ``custom_jvp`` rather than a ``custom_vjp`` keeps forward mode (``jax.jvp``, as the
    NTK code uses) and higher derivatives working.
    """
    if w.shape[2] == 1:
        return _conv_by_shifts(x, w, stride, out_h, out_w)
    return _conv_by_patches(x, w, stride, out_h, out_w)


def _conv_valid_jvp(stride, out_h, out_w, primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = _conv_valid(x, w, stride, out_h, out_w)

    parts = []
    if type(dw) is not jax.custom_derivatives.SymbolicZero:
        row_band = _uses_row_band(x.shape[2], w.shape, stride)
        kernel_tangent = _conv_by_row_band if row_band else _conv_by_transposed_patches
        parts.append(kernel_tangent(x, dw, stride, out_h, out_w))
    if type(dx) is not jax.custom_derivatives.SymbolicZero:
        parts.append(_conv_by_patches(dx, w, stride, out_h, out_w))
    if not parts:
        return y, jnp.zeros_like(y)
    return y, functools.reduce(jnp.add, parts)


_conv_valid.defjvp(_conv_valid_jvp, symbolic_zeros=True)


def _conv_patches(x, w, *, stride, padding):
    """Convolution as patches plus matrix products (im2col), with hand-chosen derivatives.

    Pads for SAME, then runs ``_conv_valid``. On XLA:CPU a LeNet backprop step at batch
    128 took about 0.6 of the time of a single-concatenate im2col, and 0.55 to 0.6 of
    ``lax.conv_general_dilated``'s. It uses no XLA convolution, whose weight gradient takes
    a slow path inside ``lax.scan``.
    """
    _check_input(x, w, padding)
    kh, kw, _, _ = w.shape
    x, out_h, out_w = _pad_for_valid(x, kh, kw, stride, padding)
    return _conv_valid(x, w, stride, out_h, out_w)


def _pad_for_valid(x, kh: int, kw: int, stride: int, padding: str):
    """Pad ``x`` for SAME padding (nothing for VALID) and return it with the output size.

    Returns ``(x, out_h, out_w)``: a VALID convolution of the returned ``x`` has the output
    of the ``padding`` convolution of the input.
    """
    _, h, wd, _ = x.shape
    if padding == "SAME":
        pad_h, pad_w = _same_padding(h, kh, stride), _same_padding(wd, kw, stride)
        x = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    out_h = conv_output_size(h, kh, stride, padding)
    out_w = conv_output_size(wd, kw, stride, padding)
    return x, out_h, out_w


CONV_IMPLEMENTATIONS = {"patches": _conv_patches, "xla": _conv_xla}


def conv2d(
    features: int,
    kernel_size: int | tuple[int, int] = 3,
    *,
    stride: int = 1,
    padding: str = "SAME",
    use_bias: bool = True,
    w_init: initializers.Initializer | str = "he_normal",
    b_init: initializers.Initializer | str = "zeros",
    implementation: str = "patches",
) -> Layer:
    """2-D convolution (cross-correlation), NHWC input, HWIO kernel.

    Shapes: ``x`` (batch, height, width, in), ``w`` (kh, kw, in, features), ``b``
    (features,), ``y`` (batch, out_h, out_w, features) with ``out = ceil(n / stride)`` for
    SAME and ``floor((n - k) / stride) + 1`` for VALID.

    Args:
        implementation: ``"patches"`` (im2col: strided slices and matrix products, with
            the forward pass and each derivative in the form that ran fastest on CPU) or
            ``"xla"`` (``lax.conv_general_dilated``). Both compute the same function and
            support forward and reverse mode.
    """
    single = isinstance(kernel_size, numbers.Integral)
    kernel = (kernel_size, kernel_size) if single else kernel_size
    features = _count("conv2d features", features)
    is_pair = isinstance(kernel, (tuple, list)) and len(kernel) == 2
    if not (is_pair and all(_is_count(k) and k <= MAX_SIZE for k in kernel)):
        raise ValueError(
            f"conv2d kernel_size must be a positive integer or a pair of them, got "
            f"{kernel_size!r} (each size at most 2**63 - 1)"
        )
    kh, kw = (int(size) for size in kernel)
    stride = _count("conv2d stride", stride)
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"conv2d padding must be 'SAME' or 'VALID', got {padding!r}")
    if implementation not in CONV_IMPLEMENTATIONS:
        raise ValueError(
            f"conv2d implementation must be one of {sorted(CONV_IMPLEMENTATIONS)}, "
            f"got {implementation!r}"
        )
    w_init, b_init = initializers.get(w_init), initializers.get(b_init)
    linear_fn = functools.partial(
        CONV_IMPLEMENTATIONS[implementation], stride=stride, padding=padding
    )

    def init(key, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                f"conv2d expects an image input (height, width, channels), got input shape "
                f"{tuple(input_shape)}"
            )
        h, w, cin = _layer_input_shape("conv2d", input_shape, "(height, width, channels)")
        out_h = conv_output_size(h, kh, stride, padding)
        out_w = conv_output_size(w, kw, stride, padding)
        if out_h < 1 or out_w < 1:
            raise ValueError(
                f"conv2d kernel {kh}x{kw} with VALID padding does not fit input {h}x{w}; "
                "use padding='SAME' or a smaller kernel"
            )
        _check_weight_size("conv2d", (kh, kw, cin, features))
        w_key, b_key = jax.random.split(key)
        params = {"w": w_init(w_key, (kh, kw, cin, features))}
        if use_bias:
            params["b"] = b_init(b_key, (features,))
        return (out_h, out_w, features), params

    layer = _linear_layer(linear_fn, init)
    _mark(layer, "_bpalt_conv", _ConvSpec(kh, kw, stride, padding, implementation))
    return layer


# --- Pooling -------------------------------------------------------------------------------


def _pool(reduce: str, window: int, stride: int | None, padding: str) -> Layer:
    stride = window if stride is None else stride
    window = _count("pool window", window)
    stride = _count("pool stride", stride)
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"pool padding must be 'SAME' or 'VALID', got {padding!r}")

    def shape_fn(input_shape):
        h, w, c = _layer_input_shape("pooling", input_shape, "(height, width, channels)")
        out_h = conv_output_size(h, window, stride, padding)
        out_w = conv_output_size(w, window, stride, padding)
        if out_h < 1 or out_w < 1:
            raise ValueError(
                f"pool window {window}x{window} with {padding} padding does not fit input "
                f"{h}x{w}; use fewer pooling layers or a larger input"
            )

        # A SAME window wider than the input needs more padding than the input's size.
        # XLA's derivative of such a pool aborted the process for windows of 2**30 and more.
        if window > min(h, w):
            raise ValueError(
                f"pool window {window}x{window} is larger than the input {h}x{w}; use a "
                f"window of at most {min(h, w)} (VALID padding with the input's size pools "
                f"over all of it)"
            )
        return out_h, out_w, c

    def fn(x):
        if x.ndim != 4:
            raise ValueError(
                f"pooling expects a batch of images (batch, height, width, channels), got "
                f"input shape {tuple(x.shape)}"
            )
        n, h, w, c = x.shape
        shape_fn((h, w, c))
        if stride == window and (padding == "VALID" or (h % window == 0 and w % window == 0)):
            # Non-overlapping windows as a reshape: its gradient is far cheaper on CPU than
            # the select-and-scatter of reduce_window.
            # NOTE: this path splits the gradient evenly among tied maxima, while the
            # reduce_window path below gives it to one of them.
            oh, ow = h // window, w // window
            x = x[:, : oh * window, : ow * window].reshape(n, oh, window, ow, window, c)
            return x.max(axis=(2, 4)) if reduce == "max" else x.mean(axis=(2, 4))
        dims, strides = (1, window, window, 1), (1, stride, stride, 1)
        if reduce == "max":
            return lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, padding)
        summed = lax.reduce_window(x, 0.0, lax.add, dims, strides, padding)
        counts = lax.reduce_window(jnp.ones_like(x[:1]), 0.0, lax.add, dims, strides, padding)
        return summed / counts

    layer = _parameter_free(fn, shape_fn)
    _mark(layer, "_bpalt_pool", _PoolSpec(reduce, window, stride, padding))
    return layer


def max_pool(window: int = 2, stride: int | None = None, padding: str = "VALID") -> Layer:
    """Max pooling over ``window x window`` patches; ``stride`` defaults to ``window``.

    NOTE: on XLA:CPU (jaxlib 0.10.2) max reductions over larger arrays skip NaN. For
    (32, 8, 8, 16) inputs, a window with one NaN gave the largest of its other entries, and
    a window of NaN only gave -inf. (2, 4, 4, 16) inputs gave NaN. NaN inputs can thus
    come out of a network as finite logits. The file loaders of ``bpalt.data`` reject NaN;
    check other inputs with ``jnp.isfinite``.
    """
    return _pool("max", window, stride, padding)


def avg_pool(window: int = 2, stride: int | None = None, padding: str = "VALID") -> Layer:
    """Average pooling; with SAME padding the mean is over the valid inputs only."""
    return _pool("avg", window, stride, padding)


# --- A convolution fused with its pool ------------------------------------------------------


def _mark(layer: Layer, name: str, spec) -> None:
    """Attach ``spec`` to both forward functions of ``layer`` as attribute ``name``."""
    setattr(layer.apply, name, spec)
    setattr(layer.feedback_apply, name, spec)


def _spec(layer: Layer, name: str):
    """Return the spec ``name`` that both forward functions of ``layer`` carry, else None.

    A layer whose ``apply`` or ``feedback_apply`` was replaced (``layer._replace(...)``)
    carries it on one of them only, so ``serial`` leaves it unfused.
    """
    spec = getattr(layer.apply, name, None)
    return spec if spec is not None and getattr(layer.feedback_apply, name, None) is spec else None


class _ConvSpec(NamedTuple):
    """The facts about a ``conv2d`` layer that ``serial`` reads to fuse it with a pool."""

    kh: int
    kw: int
    stride: int
    padding: str
    implementation: str


class _PoolSpec(NamedTuple):
    """The facts about a pooling layer that ``serial`` reads to fuse it with a convolution."""

    reduce: str
    window: int
    stride: int
    padding: str


FUSED_POOL_MIN_KERNEL = 5
"""Smallest kernel side for which ``serial`` computes a convolution on its pool's grid.

In one process, with alternating rounds, LeNet's backprop step at batch 128 (5 x 5
kernels, 2 x 2 pools) took 0.64 of the unfused step's time with both convolution blocks
fused. The digits CNN's step (3 x 3 kernels on 8 x 8 and 4 x 4 inputs) took 1.31 with
both fused and 1.07 with the first one alone, so 3 x 3 kernels stay unfused.
"""


@functools.cache
def _pool_grid_selector(kh: int, kw: int, window: int) -> np.ndarray:
    """Build the 0/1 tensor that maps a kernel onto the pool grid.

    Shape (th, tw, P, P, P, P, kh, kw) with ``P = window`` and ``th = ceil((kh + P - 1) /
    P)`` taps. Entry ``[U, V, a, b, p, q, u, v]`` is 1 where ``u = P U + a - p`` and ``v =
    P V + b - q``. There, input offset ``(a, b)`` of grid cell ``(i + U, j + V)`` meets
    kernel entry ``(u, v)`` for the output at offset ``(p, q)`` of pool window ``(i, j)``.
    """
    th, tw = -(-(kh + window - 1) // window), -(-(kw + window - 1) // window)
    selector = np.zeros((th, tw, window, window, window, window, kh, kw), np.float32)
    for tap_h, tap_w, a, b, p, q in np.ndindex(th, tw, window, window, window, window):
        u, v = window * tap_h + a - p, window * tap_w + b - q
        if 0 <= u < kh and 0 <= v < kw:
            selector[tap_h, tap_w, a, b, p, q, u, v] = 1.0
    return selector


def _space_to_depth(x, window: int, height: int, width: int):
    """Fold ``window x window`` cells into channels: (n, height * P, width * P, c) ->
    (n, height, width, P * P * c), channels ordered (row offset, column offset, c).

    ``x`` is first cut or zero-padded at its high end to ``height * P`` rows and ``width *
    P`` columns.
    """
    n, h, w, c = x.shape
    rows, columns = height * window, width * window
    x = x[:, :rows, :columns]
    if h < rows or w < columns:
        x = jnp.pad(x, ((0, 0), (0, max(rows - h, 0)), (0, max(columns - w, 0)), (0, 0)))
    x = x.reshape(n, height, window, width, window, c)
    return jnp.transpose(x, (0, 1, 3, 2, 4, 5)).reshape(n, height, width, window * window * c)


def _conv_on_pool_grid(x, w, window: int, pooled_h: int, pooled_w: int):
    """Compute the VALID convolution's outputs window by window of a ``P x P`` pool.

    Returns ``z`` (n, pooled_h, pooled_w, P * P, out) with ``z[:, i, j, P p' + q'] =
    conv(x, w)[:, P i + p', P j + q']``. The input is folded into ``P x P`` cells of
    channels (``_space_to_depth``) and the kernel onto that grid (``_pool_grid_selector``),
    so the convolution becomes a VALID one with ``th x tw`` taps, ``P * P * in`` input
    channels and ``P * P * out`` output channels, computed by ``_conv_valid``. A pool's
    window is then one axis of contiguous channels. The arithmetic grows by ``(th tw P^2) /
    (kh kw)``: 1.44 for a 5 x 5 kernel and a 2 x 2 pool.

    NOTE: the grid kernel's zeros multiply input entries that an output does not depend
    on, so an infinite input entry turns the neighbouring windows' outputs into NaN too,
    where the layers one by one leave them finite.
    """
    kh, kw, cin, cout = w.shape
    selector = _pool_grid_selector(kh, kw, window)
    th, tw = selector.shape[:2]
    cells = _space_to_depth(x, window, pooled_h + th - 1, pooled_w + tw - 1)
    grid_kernel = jnp.einsum("UVabpquv,uvio->UVabipqo", jnp.asarray(selector, w.dtype), w)
    grid_kernel = grid_kernel.reshape(th, tw, window * window * cin, window * window * cout)
    z = _conv_valid(cells, grid_kernel, 1, pooled_h, pooled_w)
    return z.reshape(*z.shape[:3], window * window, cout)


def _fused_conv_pool(conv: _ConvSpec, activations: Sequence[Callable], pool: _PoolSpec):
    """Build ``run(conv_params, feedback_w, x)`` for conv2d, elementwise layers and a pool.

    ``run`` returns what the layers return one after another. It returns None in two cases,
    and the caller then runs the layers one by one. In the first, the pool would not take
    its reshape path (SAME padding on a size its window does not divide). In the second,
    the convolution's output is narrower than the window. With ``feedback_w``, the
    convolution's input gradient goes through it (``feedback_linear``).
    """
    window = pool.window

    def run(conv_params, feedback_w, x):
        w = conv_params["w"]
        _check_input(x, w, conv.padding)
        if x.shape[0] == 0:
            return None
        x, out_h, out_w = _pad_for_valid(x, conv.kh, conv.kw, 1, conv.padding)
        too_small = out_h < window or out_w < window
        if too_small or (pool.padding == "SAME" and (out_h % window or out_w % window)):
            return None

        def linear(x, w):
            return _conv_on_pool_grid(x, w, window, out_h // window, out_w // window)

        if feedback_w is None:
            z = linear(x, w)
        else:
            z = feedback_linear(linear, x, w, feedback_w)
        if "b" in conv_params:
            z = z + conv_params["b"].reshape(1, 1, 1, 1, -1)
        for activation in activations:
            z = activation(z)
        return z.max(axis=3) if pool.reduce == "max" else z.mean(axis=3)

    return run


def _fusion_at(layers: Sequence[Layer], start: int):
    """Return ``(stop, run)`` when ``layers[start:stop]`` is a conv2d that ``serial`` fuses
    with its pool, else None.

    Fused: a ``"patches"`` convolution at stride 1 whose kernel sides are at least
    ``FUSED_POOL_MIN_KERNEL``, then any number of elementwise layers (``relu``, ``tanh``,
    ``sigmoid``, ``identity``), then a max or average pool whose stride equals its window.
    """
    conv = _spec(layers[start], "_bpalt_conv")
    if conv is None or conv.stride != 1 or conv.implementation != "patches":
        return None
    if min(conv.kh, conv.kw) < FUSED_POOL_MIN_KERNEL:
        return None
    stop, activations = start + 1, []
    while stop < len(layers):
        activation = _spec(layers[stop], "_bpalt_elementwise")
        if activation is None:
            break
        activations.append(activation)
        stop += 1
    pool = _spec(layers[stop], "_bpalt_pool") if stop < len(layers) else None
    if pool is None or pool.window != pool.stride or pool.window < 2:
        return None
    return stop + 1, _fused_conv_pool(conv, activations, pool)


# --- Parameter-free layers -------------------------------------------------------------------


flatten = _parameter_free(
    lambda x: x.reshape(x.shape[0], -1), lambda shape: (math.prod(shape),)
)
"""Flatten everything but the batch axis: (batch, ...) -> (batch, features)."""

relu = _parameter_free(jax.nn.relu, elementwise=True)
tanh = _parameter_free(jnp.tanh, elementwise=True)
sigmoid = _parameter_free(jax.nn.sigmoid, elementwise=True)
identity = _parameter_free(lambda x: x, elementwise=True)


def serial(*layers: Layer) -> Layer:
    """Compose layers in order; the params are a tuple with one entry per layer.

    A ``conv2d`` with a kernel of at least ``FUSED_POOL_MIN_KERNEL`` at stride 1, followed by
    elementwise layers and a pool with equal window and stride, runs as one fused
    computation (``_conv_on_pool_grid``): the same function, the same params and the same
    gradients, ties of the max included, in a layout where each pool window is a
    contiguous axis.
    """
    if not layers:
        raise ValueError("serial needs at least one layer")
    for index, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise ValueError(f"serial argument {index} is not a Layer: {layer!r}")

    plan, start = [], 0
    while start < len(layers):
        fusion = _fusion_at(layers, start)
        stop, run = fusion if fusion is not None else (start + 1, None)
        plan.append((start, stop, run))
        start = stop

    def run_layers(params, feedback, x):
        for start, stop, run in plan:
            if run is not None:
                fused_feedback = None if feedback is None else feedback[start]["w"]
                y = run(params[start], fused_feedback, x)
                if y is not None:
                    x = y
                    continue
            for index in range(start, stop):
                if feedback is None:
                    x = layers[index].apply(params[index], x)
                else:
                    x = layers[index].feedback_apply(params[index], feedback[index], x)
        return x

    def init(key, input_shape):
        params = []
        shape = tuple(input_shape)
        for layer, layer_key in zip(layers, jax.random.split(key, len(layers))):
            shape, layer_params = layer.init(layer_key, shape)
            params.append(layer_params)
        return shape, tuple(params)

    def apply(params, x):
        return run_layers(params, None, x)

    def feedback_apply(params, feedback, x):
        return run_layers(params, feedback, x)

    return Layer(init, apply, feedback_apply)


def from_flax(module) -> Layer:
    """Adapt a ``flax.linen`` module into a layer (its variables become the params).

    ``module.init`` and ``module.apply`` are the same pair as a layer's, so the adapter only
    computes the output shape. Feedback alignment cannot see inside the module: its
    ``feedback_apply`` is the plain forward pass, so the module's gradient is the true one.
    """

    def init(key, input_shape):
        dummy = jnp.zeros((1, *input_shape), jnp.float32)
        variables = module.init(key, dummy)
        output = jax.eval_shape(module.apply, variables, dummy)
        return tuple(output.shape[1:]), variables

    def apply(params, x):
        return module.apply(params, x)

    def feedback_apply(params, feedback, x):
        del feedback
        return module.apply(params, x)

    return Layer(init, apply, feedback_apply)


# --- The network of blocks ---------------------------------------------------------------------


def _input_shape(input_shape) -> Shape:
    """Return ``input_shape`` as a tuple of Python ints, or raise ``ValueError`` unless it is
    a non-empty sequence of positive integers."""
    if isinstance(input_shape, np.ndarray) and input_shape.ndim == 1:
        input_shape = tuple(input_shape.tolist())
    is_sequence = isinstance(input_shape, (tuple, list)) and len(input_shape) > 0
    if not (is_sequence and all(_is_count(d) and d <= MAX_SIZE for d in input_shape)):
        raise ValueError(
            f"input_shape must be the shape of one example as positive integers, such as "
            f"(8, 8, 1) for 8 x 8 grey images, got {input_shape!r}"
        )
    return tuple(int(d) for d in input_shape)


AUTO_BATCH_CHUNKS = 4
"""Chunks of ``batch_chunks="auto"``. LeNet's step at batch 128 took 0.80 of one chain's time
in 4 chunks, 0.86 in 2 and 0.84 in 8 (medians of per-round ratios, one process)."""
AUTO_CHUNK_MIN_BATCH = 128
"""Smallest batch that ``batch_chunks="auto"`` splits; the digits CNN at 64 gained nothing."""


class Network:
    """A sequence of blocks with one parameter pytree: a tuple, one entry per block.

    Rules that work block by block (DFA, HSIC, Greedy InfoMax) use the block boundaries; the
    others see ``apply`` as one function.

    ``apply``, ``forward`` and ``feedback_apply`` can run the batch as a few independent
    chunks and concatenate the results (``batch_chunks``). The function is the same, since
    every block of ``bpalt.nn`` treats examples independently; only the computation graph
    changes. XLA:CPU runs independent chains of operations at the same time, so on a 2-core
    CPU LeNet's backprop step at batch 128 ran 10 to 20 % faster in 4 chunks than in one
    (two measurements), and a 784-500-10 MLP's took 1.5 ms against 1.8 ms.

    Args:
        blocks: the blocks, each a ``Layer``; the last one produces the logits.
        input_shape: shape of one example, e.g. ``(8, 8, 1)``.
        batch_chunks: ``1`` (the default: one chain), a positive number of chunks, or
            ``"auto"`` (``AUTO_BATCH_CHUNKS`` chunks for batches of at least
            ``AUTO_CHUNK_MIN_BATCH`` examples, one chain below). Use more than one only when
            every block treats examples independently: a block that mixes the examples of a
            batch (batch statistics, for instance) would then see one chunk at a time.
    """

    def __init__(
        self,
        blocks: Sequence[Layer],
        input_shape: Sequence[int],
        batch_chunks: int | str = 1,
    ):
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError("a Network needs at least one block")
        for index, block in enumerate(blocks):
            if not isinstance(block, Layer):
                raise ValueError(f"block {index} is not a Layer: {block!r}")
        if batch_chunks != "auto":
            if (
                isinstance(batch_chunks, bool)
                or not isinstance(batch_chunks, numbers.Integral)
                or batch_chunks < 1
            ):
                raise ValueError(
                    f"batch_chunks must be a positive integer or 'auto', got {batch_chunks!r}"
                )
            batch_chunks = int(batch_chunks)
        self.blocks = blocks
        self.input_shape = _input_shape(input_shape)
        self.batch_chunks = batch_chunks
        self.block_shapes = self._shapes()

    def _shapes(self) -> tuple[Shape, ...]:
        # Shapes are static Python ints: read them from init traced abstractly, so no
        # weights are allocated.
        shapes, shape = [], self.input_shape
        for block in self.blocks:
            captured = []

            def trace_init(key, block=block, shape=shape, captured=captured):
                output_shape, params = block.init(key, shape)
                captured.append(tuple(int(d) for d in output_shape))
                return params

            jax.eval_shape(trace_init, jax.random.key(0))
            shape = captured[0]
            shapes.append(shape)
        return tuple(shapes)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def block_names(self) -> tuple[str, ...]:
        """``("block0", "block1", ...)``: the suffixes of per-block metric names."""
        return tuple(f"block{i}" for i in range(len(self.blocks)))

    @property
    def output_shape(self) -> Shape:
        return self.block_shapes[-1]

    def init(self, key: jax.Array, input_shape: Sequence[int] | None = None) -> tuple:
        """Initialise the params: a tuple with one entry per block.

        ``input_shape`` defaults to the network's own; a different one is rejected, since
        every rule sizes its state from the network's shapes.
        """
        if input_shape is not None and tuple(input_shape) != self.input_shape:
            raise ValueError(
                f"input shape {tuple(input_shape)} does not match the network's "
                f"{self.input_shape}; build the Network with input_shape={tuple(input_shape)}"
            )
        params, shape = [], self.input_shape
        for block, block_key in zip(self.blocks, jax.random.split(key, len(self.blocks))):
            shape, block_params = block.init(block_key, shape)
            params.append(block_params)
        return tuple(params)

    def chunks_for(self, batch_size: int) -> int:
        """Return the number of chunks that ``apply`` splits a batch of ``batch_size`` into."""
        if self.batch_chunks == "auto":
            return AUTO_BATCH_CHUNKS if batch_size >= AUTO_CHUNK_MIN_BATCH else 1
        return max(1, min(self.batch_chunks, batch_size))

    def in_chunks(self, fn: Callable[[jax.Array], Any], x: jax.Array):
        """Compute ``fn(x)`` as ``fn`` of each chunk of the batch, concatenated.

        ``fn`` maps a batch to a pytree of arrays with a leading batch axis, and must treat
        examples independently. The chunks follow ``chunks_for(x.shape[0])``.
        """
        chunks = self.chunks_for(x.shape[0])
        if chunks == 1:
            return fn(x)
        outputs = [fn(chunk) for chunk in jnp.array_split(x, chunks)]
        return jax.tree.map(lambda *parts: jnp.concatenate(parts), *outputs)

    def apply(self, params, x: jax.Array) -> jax.Array:
        """Logits of a batch: (batch, *input_shape) -> (batch, *output_shape)."""

        def logits(x):
            for block, block_params in zip(self.blocks, params):
                x = block.apply(block_params, x)
            return x

        self.check_input(x)
        return self.in_chunks(logits, x)

    def forward(self, params, x: jax.Array) -> list[jax.Array]:
        """Return every block's output in order. The last entry is the logits."""

        def block_outputs(x):
            outputs = []
            for block, block_params in zip(self.blocks, params):
                x = block.apply(block_params, x)
                outputs.append(x)
            return outputs

        self.check_input(x)
        return self.in_chunks(block_outputs, x)

    def feedback_apply(self, params, feedback, x: jax.Array) -> jax.Array:
        """Logits, with every linear layer's input gradient sent through ``feedback``."""

        def logits(x):
            for block, block_params, block_feedback in zip(self.blocks, params, feedback):
                x = block.feedback_apply(block_params, block_feedback, x)
            return x

        self.check_input(x)
        return self.in_chunks(logits, x)

    def check_input(self, x) -> None:
        """Raise ``ValueError`` if ``x`` is not a batch of this network's input shape.

        ``apply``, ``forward`` and ``feedback_apply`` call it while tracing, where shapes
        are static, so it costs nothing in a compiled step.
        """
        if not hasattr(x, "ndim"):
            raise ValueError(
                f"expected an array of shape (batch, *{self.input_shape}), got "
                f"{type(x).__name__}; convert it with jnp.asarray"
            )
        if jnp.iscomplexobj(x):
            raise ValueError(
                f"expected real inputs, got dtype {x.dtype}; pass the real part or the "
                "magnitude as float32"
            )
        if tuple(x.shape) == self.input_shape:
            raise ValueError(
                f"expected a batch of shape (batch, *{self.input_shape}), got one example of "
                f"shape {tuple(x.shape)} without the batch axis; pass x[None]"
            )
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(
                f"expected a non-empty batch of shape (batch, *{self.input_shape}), got an "
                f"array of shape {tuple(x.shape)}"
            )
        shape = tuple(x.shape[1:])
        if shape != self.input_shape:
            raise ValueError(
                f"data of shape {shape} per example does not match the network's input shape "
                f"{self.input_shape}; build the network for this data set's input shape"
            )

    def __repr__(self) -> str:
        return (
            f"Network({len(self.blocks)} blocks, input_shape={self.input_shape}, "
            f"batch_chunks={self.batch_chunks!r})"
        )
