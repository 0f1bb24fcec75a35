"""Input data: TFDS builders for local dataset folders (cub.py) and the grain host pipeline (pipeline.py).

Import the submodules directly; this package imports nothing so that `import fgpair_jax.data.pipeline`
does not pull in TFDS.
"""
