"""shardstate inside vLLM: the `shardstate` load format (plugin.py registers it; loader.py is the loader),
its options, cache keys, and the cache entries' reading and filling. Importing this package does not import
vLLM; only plugin.register() and loader.py do."""
