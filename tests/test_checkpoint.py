"""Checkpoints: exact msgpack round trips, no code execution, atomic writes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bpalt import checkpoint, models, rules, train


def _state():
    network = models.digits_cnn(channels=(2, 4))
    rule = rules.get("fa", network)
    return train.init_seeds(rule, network, optax.adam(1e-3), [0, 1])


def test_round_trip_exact(tmp_path):
    state = _state()
    path = tmp_path / "state.msgpack"

    checkpoint.save(path, state, {"epoch": 7})
    restored, metadata = checkpoint.load(path, _state())

    assert metadata == {"epoch": 7}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        if jnp.issubdtype(old.dtype, jax.dtypes.prng_key):
            old, new = jax.random.key_data(old), jax.random.key_data(new)
        assert old.dtype == new.dtype
        assert np.array_equal(np.asarray(old), np.asarray(new))


def test_file_is_msgpack_not_pickle(tmp_path):
    path = tmp_path / "state.msgpack"
    checkpoint.save(path, {"w": jnp.ones(3)})

    raw = path.read_bytes()

    assert raw[:1] != b"\x80"  # every pickle protocol >= 2 starts with 0x80
    assert 0x80 <= raw[0] <= 0x8F or raw[0] in (0xDE, 0xDF)  # a msgpack map


def test_mismatched_template_rejected(tmp_path):
    path = tmp_path / "state.msgpack"
    checkpoint.save(path, {"w": jnp.ones(3)})

    with pytest.raises(ValueError, match=r"shape \(3,\).*expected \(4,\)"):
        checkpoint.load(path, {"w": jnp.ones(4)})
    with pytest.raises(ValueError, match="checkpoint has 1 arrays but the state has 2"):
        checkpoint.load(path, {"w": jnp.ones(3), "b": jnp.ones(3)})


def test_atomic_write_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    checkpoint.write_atomic(path, "first")
    checkpoint.write_atomic(path, "second")

    assert path.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_write_atomic_follows_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        checkpoint.write_atomic(tmp_path / "a.txt", "text")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
