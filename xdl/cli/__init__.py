"""The ``xdl`` command: one module per command, each parsing flags, calling :mod:`xdl.api`
and printing where its output went. Imports: xdl.api (inside handlers, for start-up time) and
the light registry; ``xdl --help`` imports no torch.
"""
