"""mmllm: toy listings (photos, title, description, seller table) to structured JSON.

Modules, one concept each (see DESIGN.md in the repository):
``catalog`` (listing rows, streaming readers, validation), ``images`` (safe image loading),
``schema`` (label schema, JSON Schema, prediction validation), ``config`` (typed YAML configs),
``tiny`` (tiny random checkpoints for tests), and the command-line layer ``cli``.
"""

__version__ = "0.1.0"
