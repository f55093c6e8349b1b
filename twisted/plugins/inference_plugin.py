"""Registers ``twistd inference`` (this folder must not get an ``__init__.py``: it would hide Twisted's)."""

from twisted.application.service import ServiceMaker

inference = ServiceMaker(
    "inference",
    "inference.tap",
    "OpenAI-compatible gateway for LM Studio, OpenAI and a built-in mock",
    "inference",
)
