"""Can the decoder render birds from pooled features if it gets more steps than a quick run gives it?

Issue 5 asks that reconstructions resemble birds by the end of the quick run; the quick run gives the
decoder 92 steps of 16 images. This study separates "too few steps" from "cannot": it trains the
configured decoder alone, with L_R and its own optimiser, on cached (h, image) pairs — h = the pooled
features a finished run saved in eval/features.npz, image = the centre crop the evaluation encoded —
and records held-out (test split) pixel MSE against the best constant (the mean train image) after
each epoch, plus a PNG of test and train reconstructions at the end. Decoder-only steps cost a small
fraction of an encoder step, so many epochs fit in minutes on a CPU.

    python benchmarks/decoder_study.py --run=workdirs/table/moco_seed0 --epochs=30 \
        --out=results/decoder_study/moco_seed0.json
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from fgpair_jax import run_config, viz
from fgpair_jax.data import augment, pipeline, sources as data_sources
from fgpair_jax.methods import fgpair
from fgpair_jax.models import input_normalization

_RUN = flags.DEFINE_string("run", "workdirs/table/moco_seed0", "A finished run's workdir (config.json, eval/).")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Decoder-only epochs over the cached train pairs.")
_BATCH = flags.DEFINE_integer("batch", 64, "Decoder batch size.")
_OUT = flags.DEFINE_string("out", "results/decoder_study/study.json", "JSON result (the PNG goes beside it).")


def encoded_images(config, source) -> np.ndarray:
    """The evaluation's centre crops of every record, normalised like the encoder's inputs."""
    crops = np.stack([pipeline.eval_transform(source[i]["image"], config.data.image_size) for i in range(len(source))])
    return np.asarray(augment.normalize(crops, *input_normalization(config.model)))


def make_train_step(decoder, tx):
    @jax.jit
    def step(params, opt_state, h, images):
        def reconstruction_loss(p):
            return jnp.mean(jnp.square(decoder.apply({"params": p}, h) - images))

        loss, grads = jax.value_and_grad(reconstruction_loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def held_out_mse(render, params, h, images, batch: int) -> float:
    errors = [np.mean(np.square(np.asarray(render(params, h[i:i + batch])) - images[i:i + batch]), axis=(1, 2, 3))
              for i in range(0, len(h), batch)]
    return float(np.mean(np.concatenate(errors)))


def main(argv):
    del argv
    config = run_config.load(_RUN.value)
    sources, _ = data_sources.load_sources(config, _RUN.value)
    with np.load(os.path.join(_RUN.value, "eval", "features.npz")) as saved:
        train_h, test_h = saved["train_features"], saved["test_features"]
    train_x, test_x = encoded_images(config, sources["train"]), encoded_images(config, sources["test"])
    mean_image = train_x.mean(axis=0, keepdims=True)
    baseline = float(np.mean(np.square(test_x - mean_image)))

    decoder = fgpair.decoder(config)
    params = decoder.init(jax.random.key(0), jnp.zeros((1, train_h.shape[1])))["params"]
    tx = optax.adam(config.fgpair.decoder_learning_rate)
    opt_state = tx.init(params)
    step = make_train_step(decoder, tx)
    render = jax.jit(lambda p, x: decoder.apply({"params": p}, x))
    rng = np.random.default_rng(0)
    curve, steps, started = [], 0, time.perf_counter()
    for epoch in range(1, _EPOCHS.value + 1):
        order = rng.permutation(len(train_h))
        for i in range(0, len(order) - _BATCH.value + 1, _BATCH.value):
            index = order[i:i + _BATCH.value]
            params, opt_state, _ = step(params, opt_state, train_h[index], train_x[index])
            steps += 1
        test_mse = held_out_mse(render, params, test_h, test_x, 256)
        curve.append({"epoch": epoch, "steps": steps, "test_mse": test_mse, "vs_mean_image": test_mse / baseline})
        print(f"epoch {epoch}: {steps} steps, test MSE {test_mse:.4f} ({test_mse / baseline:.3f} of the mean image's)")
    seconds = time.perf_counter() - started

    shown = np.linspace(0, len(test_h) - 1, 6).astype(int)
    shown_train = np.linspace(0, len(train_h) - 1, 6).astype(int)
    images = np.concatenate([test_x[shown], train_x[shown_train]])
    rendered = np.asarray(render(params, np.concatenate([test_h[shown], train_h[shown_train]])))
    png = os.path.splitext(_OUT.value)[0] + ".png"
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    viz.save_pair_grid(viz.to_uint8_image(images, config.model), viz.to_uint8_image(rendered, config.model),
                       viz.to_uint8_image(np.broadcast_to(mean_image, images.shape), config.model), png,
                       titles=("image", "decoded h", "mean train image"))
    result = {
        "run": _RUN.value, "decoder_channels": list(config.fgpair.decoder_channels),
        "image_size": config.data.image_size, "learning_rate": config.fgpair.decoder_learning_rate,
        "batch": _BATCH.value, "train_images": len(train_h), "test_images": len(test_h),
        "mean_image_test_mse": baseline, "curve": curve, "seconds": round(seconds, 1),
        "figure": png, "figure_rows": "6 test images, then 6 train images; columns: image, reconstruction, mean image",
    }
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
