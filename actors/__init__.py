"""Ray-agnostic code that runs inside workers: stages, bundles, backends, DSP.

Nothing here imports torch or `export/`; the import contract in pyproject.toml
is checked by the test suite.
"""
