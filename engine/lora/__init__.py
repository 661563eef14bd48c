"""LoRA at computation time (see engine.lora.loras): formats, loading, hot-swapping."""
