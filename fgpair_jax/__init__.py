"""fgpair_jax: self-supervised fine-grained features from synthesized pairs (ECCV 2024), in JAX/Flax."""

__version__ = "0.1.0"
