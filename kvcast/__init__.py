"""kvcast: load an LLM's long context fast (KV codec, streaming engine, network simulation, controllers)."""

__version__ = "0.1.0"
