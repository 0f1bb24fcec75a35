"""MoCo's building blocks as pure functions: InfoNCE against a queue, the queue itself, the EMA update.

Every SSL method in `methods/` (MoCo v2, LCR, fgpair) is built from these, so the numerics that the
comparison depends on live in one place.
"""
import chex
import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps), as torch.nn.functional.normalize (safe for an all-zero row)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def info_nce(queries: jax.Array, keys: jax.Array, queue: jax.Array, temperature: float):
    """MoCo's InfoNCE: each query's positive is its own key, the negatives are the queue.

    Args:
      queries: [B, d] L2-normalised query embeddings (carry the gradient).
      keys: [B, d] L2-normalised key embeddings from the momentum encoder (treated as constants).
      queue: [K, d] L2-normalised negative keys from earlier steps.
      temperature: softmax temperature tau.

    Returns:
      (mean loss, accuracy of picking the positive among K+1 candidates, in [0, 1]).
    """
    chex.assert_rank([queries, keys, queue], 2)
    chex.assert_equal_shape([queries, keys])
    keys = jax.lax.stop_gradient(keys)
    queue = jax.lax.stop_gradient(queue)
    positive = jnp.sum(queries * keys, axis=-1, keepdims=True)  # [B, 1]
    negative = queries @ queue.T  # [B, K]
    logits = jnp.concatenate([positive, negative], axis=1) / temperature
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=1)
    loss = -jnp.mean(log_probs[:, 0])
    accuracy = jnp.mean((jnp.argmax(logits, axis=1) == 0).astype(jnp.float32))
    return loss, accuracy


def enqueue(queue: jax.Array, pointer: jax.Array, keys: jax.Array):
    """Overwrite the oldest `B` entries of a ring buffer with `keys`; returns (queue, next pointer).

    Args:
      queue: [K, d] ring buffer of keys.
      pointer: integer scalar (int32 in the train state): the first row to overwrite.
      keys: [B, d] new keys, cast to the queue's dtype.

    Returns:
      ([K, d] queue, next pointer with `pointer`'s dtype).

    The queue length must be a multiple of the global batch (checked when the state is created), so a
    batch never wraps around the end. The column index is built in `pointer`'s dtype: a bare 0 would be
    int64 when the user's environment sets JAX_ENABLE_X64=1, and dynamic_update_slice rejects mixed types.
    """
    keys = jax.lax.stop_gradient(keys).astype(queue.dtype)
    queue = jax.lax.dynamic_update_slice(queue, keys, (pointer, jnp.zeros_like(pointer)))
    return queue, ((pointer + keys.shape[0]) % queue.shape[0]).astype(pointer.dtype)


def ema_update(ema_tree, online_tree, momentum: float):
    """ema <- momentum * ema + (1 - momentum) * online, leaf by leaf (MoCo's momentum encoder)."""
    return jax.tree.map(lambda e, o: momentum * e + (1.0 - momentum) * o, ema_tree, online_tree)


def initial_queue(rng: jax.Array, size: int, dim: int) -> jax.Array:
    """Random unit vectors, as MoCo starts its queue."""
    return l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32))
