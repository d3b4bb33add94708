"""Tools around the runtime: the local stack, the demo, tiny models and process helpers for tests and benchmarks.

The runtime (``pixelpipe.core`` and the stage folders) never imports from here.
"""
