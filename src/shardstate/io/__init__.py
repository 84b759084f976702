"""Readers that put file bytes straight into preallocated memory and count what they read."""
