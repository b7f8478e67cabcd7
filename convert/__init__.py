"""convert: the model-surgery side of dynconv (graph walking, selection, checkpoints, CLI).

The converter API lands with the converter issue; this package already carries the CLI.
"""

__all__: list[str] = []
