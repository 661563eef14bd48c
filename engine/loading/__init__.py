"""Loading from .safetensors checkpoints straight into the storage form, and disk read-ahead."""
