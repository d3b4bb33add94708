"""Processors: the worker's stages that moderate, generate and edit, and the diffusers model code they run."""
