"""On-disk things, no torch.distributed: safetensors headers, checkpoint directories."""
