"""A model directory as shardstate reads and writes it: sharded-state writer, output rules, inspect/verify."""
