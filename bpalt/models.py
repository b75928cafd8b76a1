"""Named network architectures, each defined once and shared by rules, tests and benchmarks.

Every network here is built from layers that treat examples independently, so each runs
batches of 128 or more in chunks (``nn.Network(..., batch_chunks="auto")``).
"""

from __future__ import annotations

from collections.abc import Sequence

from bpalt import initializers, nn

ACTIVATIONS: dict[str, nn.Layer] = {
    "relu": nn.relu,
    "tanh": nn.tanh,
    "sigmoid": nn.sigmoid,
    "identity": nn.identity,
}
"""Activation layers by name, so that a TOML ``[model]`` table can choose one."""


def get_activation(activation: nn.Layer | str) -> nn.Layer:
    """Return ``activation`` itself if it is a layer, else the layer named in ``ACTIVATIONS``."""
    if isinstance(activation, nn.Layer):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; accepted: {', '.join(ACTIVATIONS)} or an nn.Layer"
        )
    return ACTIVATIONS[activation]


def digits_cnn(
    input_shape: Sequence[int] = (8, 8, 1),
    num_classes: int = 10,
    channels: Sequence[int] = (16, 32),
    w_init="he_normal",
    activation: nn.Layer | str = nn.relu,
) -> nn.Network:
    """The default CNN, the same for every rule: conv-ReLU-pool blocks, then a dense output.

    With the defaults on 8x8 digits: block0 conv 3x3 16 SAME, ReLU, max-pool 2 (8x8 -> 4x4);
    block1 conv 3x3 32 SAME, ReLU, max-pool 2 (4x4 -> 2x2); block2 flatten, dense 10.
    ``w_init`` (an initializer or its name) sets the convolution kernels only; the output
    layer is always LeCun normal. ``activation`` is a layer or a name in ``ACTIVATIONS``.
    """
    activation = get_activation(activation)
    blocks = [
        nn.serial(nn.conv2d(c, 3, padding="SAME", w_init=w_init), activation, nn.max_pool(2))
        for c in channels
    ]
    blocks.append(nn.serial(nn.flatten, nn.dense(num_classes, w_init="lecun_normal")))
    return nn.Network(blocks, input_shape, batch_chunks="auto")


def patch_cnn(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    patch: int = 8,
    stride: int = 4,
    channels: Sequence[int] = (32, 16),
    kernel: int = 1,
    w_init="he_normal",
    activation: nn.Layer | str = nn.relu,
) -> nn.Network:
    """A CNN whose first block encodes overlapping image patches, for Greedy InfoMax.

    Block 0: conv ``patch x patch``, stride ``stride``, VALID, ``channels[0]``, activation.
    Each cell of its output grid encodes one image patch. With the defaults on 28x28 inputs
    the grid is 6x6, of 8x8 patches that overlap their neighbours by half.
    Blocks 1 and later: conv ``kernel x kernel``, stride 1, SAME, ``channels[i]``,
    activation, on the same grid. With the default ``kernel = 1`` every block encodes each
    patch on its own, as the authors' encoder did. With ``kernel = 3`` each block widens a
    cell's view by ``2 * stride`` pixels.
    Last block: flatten, dense ``num_classes`` (LeCun normal).
    Output shapes with the defaults: (6, 6, 32), (6, 6, 16), (10,).

    Why: Greedy InfoMax predicts cells some rows below each cell of a block's output grid.
    On ``digits_cnn`` at 28x28, block 0's cells see 4x4 pixels, from which the cells 2 to 6
    rows below are close to unpredictable. The authors instead cut each image into
    half-overlapping patches, encoded each patch separately and predicted the patches rows
    below. The strided first convolution and the 1x1 later blocks do the same. With
    ``kernel = 3``, block 1's context and target cells share pixels at the nearer offsets:
    on MNIST its InfoNCE loss fell from 3.0 to 0.2 within 15 epochs, and the read-out
    scored below random features. ``w_init`` (an initializer or its name) sets the
    convolution kernels only.
    """
    activation = get_activation(activation)
    channels = list(channels)
    if not channels:
        raise ValueError(
            "patch_cnn needs at least one hidden block, but channels is empty; "
            "give one channel count per hidden block"
        )
    blocks = [
        nn.serial(
            nn.conv2d(channels[0], patch, stride=stride, padding="VALID", w_init=w_init),
            activation,
        )
    ]
    blocks += [
        nn.serial(nn.conv2d(c, kernel, padding="SAME", w_init=w_init), activation)
        for c in channels[1:]
    ]
    blocks.append(nn.serial(nn.flatten, nn.dense(num_classes, w_init="lecun_normal")))
    return nn.Network(blocks, input_shape, batch_chunks="auto")


def lenet(
    input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, w_init="he_normal"
) -> nn.Network:
    """LeNet-5-size CNN: conv 5x5 6 VALID, ReLU, pool; conv 5x5 16 VALID, ReLU, pool;
    dense 120, 84, classes (LeCun et al. 1998; the BioTorch benchmark network).

    Blocks: two conv blocks, then flatten + dense 120 + ReLU, dense 84 + ReLU, dense output.
    ``w_init`` sets the two convolutions and the two hidden dense layers; the output layer
    is always LeCun normal.
    """
    return nn.Network(
        [
            nn.serial(nn.conv2d(6, 5, padding="VALID", w_init=w_init), nn.relu, nn.max_pool(2)),
            nn.serial(nn.conv2d(16, 5, padding="VALID", w_init=w_init), nn.relu, nn.max_pool(2)),
            nn.serial(nn.flatten, nn.dense(120, w_init=w_init), nn.relu),
            nn.serial(nn.dense(84, w_init=w_init), nn.relu),
            nn.serial(nn.dense(num_classes, w_init="lecun_normal")),
        ],
        input_shape,
        batch_chunks="auto",
    )


def mlp(
    input_shape: Sequence[int],
    hidden: Sequence[int],
    num_classes: int = 10,
    activation: nn.Layer | str = nn.relu,
    w_init="he_normal",
    b_init="zeros",
) -> nn.Network:
    """Plain fully connected network: one block per hidden layer (dense + activation),
    the first block flattening the input, and a dense output block.

    ``w_init`` and ``b_init`` (initializers or their names) apply to every dense layer, the
    output layer included. ``activation`` is a layer or a name in ``ACTIVATIONS``.
    """
    activation = get_activation(activation)
    blocks = []
    for index, width in enumerate(hidden):
        layers = [nn.flatten] if index == 0 else []
        layers += [nn.dense(width, w_init=w_init, b_init=b_init), activation]
        blocks.append(nn.serial(*layers))
    head = [nn.flatten] if not hidden else []
    head.append(nn.dense(num_classes, w_init=w_init, b_init=b_init))
    blocks.append(nn.serial(*head))
    return nn.Network(blocks, input_shape, batch_chunks="auto")


def akrout_mlp(
    input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, hidden: int = 500
) -> nn.Network:
    """One sigmoid hidden layer, e.g. 784-500-10 on MNIST, to train with binary cross-entropy.

    The network of the MNIST experiments in the public code of Akrout et al. 2019, "Deep
    Learning without Weight Transport" (arXiv:1904.05391; github.com/makrout/
    Deep-Learning-without-Weight-Transport, ``fcnn/FCNN_BP.py``): weights drawn from
    N(0, 1 / (fan_in + fan_out)), half the Xavier normal variance. That code also draws the
    biases from this distribution; here they start at zero. The output units are the
    logits of independent sigmoids, so pair this network with ``binary_cross_entropy``.
    """
    return mlp(
        input_shape,
        [hidden],
        num_classes,
        activation=nn.sigmoid,
        w_init=initializers.variance_scaling(0.5, "fan_avg", "normal"),
    )


MODELS = {
    "digits_cnn": digits_cnn,
    "patch_cnn": patch_cnn,
    "lenet": lenet,
    "mlp": mlp,
    "akrout_mlp": akrout_mlp,
}
