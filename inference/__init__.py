"""inference: an OpenAI-compatible gateway in front of LM Studio, OpenAI and a built-in mock."""

__version__ = "0.1.0"
