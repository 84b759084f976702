"""The TP inference runtime: process groups, parallel layers, workers, greedy generation, LLM."""
