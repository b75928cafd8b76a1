"""Atomic files and checkpoints in msgpack, a format that cannot execute code.

A checkpoint stores the leaves of a pytree in order, with PRNG key arrays as their raw
key data; restoring needs a template of the same structure (for example a freshly
initialised state), which also marks which leaves are keys.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization


def check_parent_folders(out: Path, option: str = "--out") -> None:
    """Raise ``ValueError`` if the nearest existing parent of ``out`` is a file.

    Such a path cannot be created, and the OS error would name neither the option nor
    the file in the way. ``option`` names the command-line option in the message.
    """
    for parent in Path(out).parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(
                    f"{option} {out} lies inside {parent}, which is a file, not a folder"
                )
            return


def check_writable(out: str | Path, option: str = "--out") -> None:
    """Raise ``ValueError`` unless a file can be created in ``out`` or its nearest parent.

    Probes by creating and removing a temporary file, which also catches what permission
    bits do not show (a read-only mount, an immutable folder, a pseudo-filesystem). Called
    before a command computes anything, so that an unwritable output costs no work.
    """
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise ValueError(
            f"{option} {out} is a symbolic link to {os.readlink(out)}, which does not exist; "
            "create its target or name another path"
        )
    check_parent_folders(out, option)
    folder = next((p for p in (out, *out.parents) if p.is_dir()), Path("."))
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".bpalt-write-check-")
    except OSError as error:
        raise ValueError(
            f"{option} {out}: cannot create files in {folder} ({error.strerror}); "
            "choose a folder you can write to"
        ) from None
    os.close(handle)
    os.unlink(probe)


def write_atomic(path: str | Path, content: bytes | str) -> None:
    """Write ``content`` to a temporary file in the same folder, then rename it over ``path``.

    A reader sees either the old file or the new one, never a partial write. The file gets
    the permissions of a plain ``open(path, "w")`` (0666 less the umask), not the 0600 of
    ``tempfile.mkstemp``.
    """
    path = Path(path)
    raw = content.encode() if isinstance(content, str) else content
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as error:
        # The OS error would name the temporary file, not the one being written.
        raise OSError(error.errno, f"cannot write {path}: {error.strerror}") from None
    try:
        os.chmod(temporary, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as file:
            file.write(raw)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise OSError(error.errno, f"cannot write {path}: {error.strerror}") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """Return the process's umask. Reading it means setting it, so it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def to_bytes(tree, metadata: dict | None = None) -> bytes:
    """Serialise a pytree's leaves (and a small metadata dict) to msgpack bytes."""
    leaves = [
        np.asarray(jax.random.key_data(leaf)) if _is_key(leaf) else np.asarray(leaf)
        for leaf in jax.tree.leaves(tree)
    ]
    payload = {"leaves": {str(i): leaf for i, leaf in enumerate(leaves)}}
    payload["metadata"] = metadata or {}
    return serialization.msgpack_serialize(payload)


def from_bytes(template, raw: bytes):
    """Restore a pytree shaped like ``template`` from ``to_bytes`` output.

    Returns:
        ``(tree, metadata)``.

    Raises:
        ValueError: if the stored leaves do not match the template's count, shapes or dtypes.
    """
    payload = serialization.msgpack_restore(raw)
    stored = payload["leaves"]
    template_leaves, treedef = jax.tree.flatten(template)
    if len(stored) != len(template_leaves):
        raise ValueError(
            f"checkpoint has {len(stored)} arrays but the state has {len(template_leaves)}; "
            "it was written by a different configuration"
        )
    leaves = []
    for i, like in enumerate(template_leaves):
        value = np.asarray(stored[str(i)])
        expected = jax.random.key_data(like) if _is_key(like) else like
        if value.shape != expected.shape or value.dtype != expected.dtype:
            raise ValueError(
                f"checkpoint array {i} has shape {value.shape} and dtype {value.dtype}, "
                f"expected {expected.shape} and {expected.dtype}"
            )
        if _is_key(like):
            leaves.append(jax.random.wrap_key_data(value, impl=jax.random.key_impl(like)))
        else:
            leaves.append(jnp.asarray(value))
    return treedef.unflatten(leaves), payload.get("metadata", {})


def save(path: str | Path, tree, metadata: dict | None = None) -> None:
    """Write a checkpoint atomically."""
    write_atomic(path, to_bytes(tree, metadata))


def load(path: str | Path, template):
    """Read a checkpoint written by ``save``; returns ``(tree, metadata)``."""
    return from_bytes(template, Path(path).read_bytes())
