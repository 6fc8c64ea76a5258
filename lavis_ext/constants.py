"""Constants shared across lavis-ext."""

# Label value that the LLM's cross-entropy ignores (query slots, prompt tokens, padding).
IGNORE_INDEX = -100
