"""The package version, read by pyproject.toml (scikit-build-core's regex provider) and fastrank.cli."""
__version__ = "0.1.0"
