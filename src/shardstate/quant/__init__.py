"""Weight-only quantization of the linear layers after load (DESIGN.md, "Quantization")."""
