"""stella: an async LLM gateway."""

__version__ = "0.1.0"
