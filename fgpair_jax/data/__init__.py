"""Input data: one reader per data set (cub.py, cars.py, aircraft.py, image_folder.py) over one shared TFDS
builder (builder.py), and the grain host pipeline (pipeline.py).

Import the submodules directly; this package imports nothing so that `import fgpair_jax.data.pipeline`
does not pull in TFDS.
"""
