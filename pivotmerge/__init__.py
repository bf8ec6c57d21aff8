"""PivotMerge: merge multimodal (LLaVA-style) models."""

__version__ = "0.1.0"
