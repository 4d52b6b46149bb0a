"""Where a model comes from: a Hugging Face folder read as data, the hub, the bundled SmolLM2."""
