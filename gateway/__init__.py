"""The OpenAI-compatible HTTP gateway: an upstream service of the pipeline (``pixelpipe gateway``)."""
