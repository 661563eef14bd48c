"""Memory engine: layer-wise VRAM management. Never imports Gradio."""
