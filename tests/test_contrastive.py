"""InfoNCE against a numpy reference; the queue's ring order; the EMA update."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgpair_jax import contrastive


def numpy_info_nce(q, k, queue, temperature):
    """MoCo's loss written out: -log softmax of [q.k, q.queue] at index 0, averaged over the batch."""
    losses, correct = [], []
    for qi, ki in zip(q.astype(np.float64), k.astype(np.float64)):
        logits = np.concatenate([[qi @ ki], queue.astype(np.float64) @ qi]) / temperature
        log_z = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
        losses.append(log_z - logits[0])
        correct.append(np.argmax(logits) == 0)
    return np.mean(losses), np.mean(correct)


def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_matches_numpy_reference(temperature):
    rng = np.random.default_rng(0)
    q, k, queue = unit_rows(rng, 6, 16), unit_rows(rng, 6, 16), unit_rows(rng, 32, 16)
    k[:3] = q[:3]  # some queries see their positive clearly, some do not
    loss, accuracy = contrastive.info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue), temperature)
    ref_loss, ref_accuracy = numpy_info_nce(q, k, queue, temperature)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert float(accuracy) == pytest.approx(ref_accuracy)


def test_info_nce_gradient_flows_to_queries_only():
    rng = np.random.default_rng(1)
    q, k, queue = (jnp.asarray(unit_rows(rng, n, 8)) for n in (4, 4, 16))
    grads = jax.grad(lambda q, k, m: contrastive.info_nce(q, k, m, 0.2)[0], argnums=(0, 1, 2))(q, k, queue)
    assert float(jnp.abs(grads[0]).sum()) > 0
    assert float(jnp.abs(grads[1]).sum()) == 0 and float(jnp.abs(grads[2]).sum()) == 0


def test_enqueue_overwrites_oldest_rows_in_ring_order():
    queue = jnp.zeros((6, 2))
    pointer = jnp.int32(0)
    for step in range(4):  # 4 batches of 2 into a queue of 6 wrap around once
        keys = jnp.full((2, 2), float(step + 1))
        queue, pointer = contrastive.enqueue(queue, pointer, keys)
    # Batches 1..4 were written to rows [0,1], [2,3], [4,5], [0,1]: batch 4 replaced batch 1.
    np.testing.assert_array_equal(np.asarray(queue)[:, 0], [4, 4, 2, 2, 3, 3])
    assert int(pointer) == 2


def test_enqueue_under_64_bit_mode_keeps_the_pointer_int32():
    """JAX_ENABLE_X64=1 in a user's shell made the literal column index int64 beside the int32 pointer."""
    with jax.enable_x64(True):
        queue, pointer = contrastive.enqueue(jnp.zeros((4, 2), jnp.float32), jnp.int32(2), jnp.ones((2, 2)))
        jitted = jax.jit(contrastive.enqueue)(queue, jnp.int32(0), jnp.full((2, 2), 2.0))
    np.testing.assert_array_equal(np.asarray(queue)[:, 0], [0, 0, 1, 1])
    assert queue.dtype == jnp.float32 and pointer.dtype == jnp.int32 and int(pointer) == 0
    np.testing.assert_array_equal(np.asarray(jitted[0])[:, 0], [2, 2, 1, 1])
    assert jitted[1].dtype == jnp.int32 and int(jitted[1]) == 2


def test_ema_update_is_the_convex_combination_leafwise():
    ema = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(3.0)}}
    online = {"a": jnp.array([3.0, 6.0]), "b": {"c": jnp.array(-1.0)}}
    out = contrastive.ema_update(ema, online, 0.75)
    np.testing.assert_allclose(out["a"], [1.5, 3.0])
    np.testing.assert_allclose(out["b"]["c"], 2.0)
    same = contrastive.ema_update(ema, online, 1.0)
    np.testing.assert_array_equal(same["a"], ema["a"])


def test_l2_normalize_handles_zero_rows():
    out = contrastive.l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
