"""What a call asks of the host that serves it: room in its context (the prompt, estimated, and the output asked
for), and the capabilities its content needs (tools, images).

The prompt is estimated at three characters a token, counting the text a model reads (messages, instructions,
tool definitions) and not image or audio data: near enough to tell a 6k-token prompt from a 40k one, cheap enough to
make only where hosts differ (the upstream still has the last word when a prompt is near its limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 3
# Where a body carries media rather than text: the data is not read as tokens of the prompt.
_MEDIA_KEYS = frozenset({"image_url", "source", "image", "file_data", "input_audio", "audio"})
_IMAGE_TYPES = frozenset({"image_url", "input_image", "image"})


@dataclass(frozen=True)
class Demand:
    prompt_tokens: int  # estimated
    output_tokens: int  # the output limit the call carries (0: none)
    tools: bool  # it offers tools the model may call
    images: bool  # its messages hold images

    @classmethod
    def of(cls, body: dict[str, Any], output_limits: tuple[str, ...]) -> Demand:
        """``body``'s demand; ``output_limits`` are the fields of its API that limit the output."""
        characters, images = _text_and_images(body)
        output = next((body[key] for key in output_limits if isinstance(body.get(key), int)), 0)
        tools = bool(body.get("tools")) and body.get("tool_choice") != "none"
        return cls(math.ceil(characters / CHARS_PER_TOKEN), output, tools, images)

    def fits_prompt(self, context: int | None) -> bool:
        return context is None or self.prompt_tokens < context

    def fits_all(self, context: int | None) -> bool:
        return context is None or self.prompt_tokens + self.output_tokens <= context


def _text_and_images(body: dict[str, Any]) -> tuple[int, bool]:
    """The characters of text in ``body`` (its ``model`` name aside) and whether it holds an image."""
    characters, images = 0, False
    pending: list[Any] = [value for key, value in body.items() if key != "model"]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if not value.startswith("data:"):
                characters += len(value)
        elif isinstance(value, dict):
            kind = value.get("type")  # (in a tool's JSON schema, "type" may be a property: an object)
            if isinstance(kind, str) and kind in _IMAGE_TYPES:
                images = True
            pending.extend(item for key, item in value.items() if key not in _MEDIA_KEYS)
        elif isinstance(value, list):
            pending.extend(value)
    return characters, images
