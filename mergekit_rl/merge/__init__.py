"""Merging: the primitives on tensors (blend, selection, rng, rounding), the method registry and
the built-in methods, the streaming engine's row blocks.

The built-in methods are imported with the package: they hand themselves to the registry
(`registry.set_builtins`), so the table is complete whichever module is imported first.
"""

from . import methods as methods
