"""mmllm: toy listings (photos, title, description, seller table) to structured JSON.

One concept per module, in layers: ARCHITECTURE.md in the repository draws them, with the contracts
between them and the path of one listing from the catalog to its JSON line.
"""

__version__ = "0.1.0"
