"""The package version, in a module of its own so that engine modules can name it without
importing the `pivotmerge` facade (which imports them)."""

__version__ = "0.1.0"
