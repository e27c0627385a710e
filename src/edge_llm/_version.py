"""edge-llm's version: one owner, read by the package, its writers (bundles, model cards) and the
build (`pyproject.toml`'s dynamic version), and importable without importing the package."""

__version__ = "0.1.0"
