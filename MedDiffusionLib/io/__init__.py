"""File formats: official checkpoints, our safetensors format, volume I/O."""
