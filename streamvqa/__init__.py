"""streamvqa: streaming video question answering."""

__version__ = "0.1.0"
