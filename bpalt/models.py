"""Named network architectures, each defined once and shared by rules, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from bpalt import nn


def digits_cnn(
    input_shape: Sequence[int] = (8, 8, 1),
    num_classes: int = 10,
    channels: Sequence[int] = (16, 32),
    w_init="he_normal",
    activation: nn.Layer = nn.relu,
) -> nn.Network:
    """The default CNN, the same for every rule: conv-ReLU-pool blocks, then a dense output.

    With the defaults on 8x8 digits: block0 conv 3x3 16 SAME, ReLU, max-pool 2 (8x8 -> 4x4);
    block1 conv 3x3 32 SAME, ReLU, max-pool 2 (4x4 -> 2x2); block2 flatten, dense 10.
    """
    blocks = [
        nn.serial(nn.conv2d(c, 3, padding="SAME", w_init=w_init), activation, nn.max_pool(2))
        for c in channels
    ]
    blocks.append(nn.serial(nn.flatten, nn.dense(num_classes, w_init="lecun_normal")))
    return nn.Network(blocks, input_shape)


def lenet(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10) -> nn.Network:
    """LeNet-5-size CNN: conv 5x5 6 VALID, ReLU, pool; conv 5x5 16 VALID, ReLU, pool;
    dense 120, 84, classes (LeCun et al. 1998; the BioTorch benchmark network).

    Blocks: two conv blocks, then flatten + dense 120 + ReLU, dense 84 + ReLU, dense output.
    """
    return nn.Network(
        [
            nn.serial(nn.conv2d(6, 5, padding="VALID"), nn.relu, nn.max_pool(2)),
            nn.serial(nn.conv2d(16, 5, padding="VALID"), nn.relu, nn.max_pool(2)),
            nn.serial(nn.flatten, nn.dense(120), nn.relu),
            nn.serial(nn.dense(84), nn.relu),
            nn.serial(nn.dense(num_classes, w_init="lecun_normal")),
        ],
        input_shape,
    )


def mlp(
    input_shape: Sequence[int],
    hidden: Sequence[int],
    num_classes: int = 10,
    activation: nn.Layer = nn.relu,
    w_init="he_normal",
    b_init="zeros",
) -> nn.Network:
    """Plain fully connected network: one block per hidden layer (dense + activation),
    the first block flattening the input, and a dense output block."""
    blocks = []
    for index, width in enumerate(hidden):
        layers = [nn.flatten] if index == 0 else []
        layers += [nn.dense(width, w_init=w_init, b_init=b_init), activation]
        blocks.append(nn.serial(*layers))
    head = [nn.flatten] if not hidden else []
    head.append(nn.dense(num_classes, w_init=w_init, b_init=b_init))
    blocks.append(nn.serial(*head))
    return nn.Network(blocks, input_shape)


MODELS = {"digits_cnn": digits_cnn, "lenet": lenet, "mlp": mlp}
