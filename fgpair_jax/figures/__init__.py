"""The project's figures, one module per figure; `fgpair_jax.viz.write_figures` draws a run's, and
`fgpair_jax.experiments` the comparison table's (`table`, `embedding.write_side_by_side`).

Every figure says what it shows, at which step, and what to look for, so that it can be read without
the README. All use matplotlib's object-oriented `Figure` (no pyplot, no backend switch): importing a
module here changes no global state.
"""
