"""The ``mriseg`` command line."""
