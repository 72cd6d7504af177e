"""DELIA: diversity-enhanced instruction adaptation for chat LLMs."""

__version__ = "0.1.0"
