"""How one tensor is stored: plain, scaled FP8, or left in its .safetensors file."""
