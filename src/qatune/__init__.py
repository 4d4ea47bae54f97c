"""qatune: fine-tune and compare extractive question-answering models."""

__version__ = "0.1.0"
