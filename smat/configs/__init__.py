"""Experiment configs shipped with smat, named bare on the command line (`--config smat_glyphs`).

Each module defines `get_config(arg=None)`; `smat.config.load` finds them here by name, so they
work from any directory and from an installed wheel. The repository's top-level `configs/` is a
link to this folder.
"""
