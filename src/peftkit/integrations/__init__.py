"""Integrations with other libraries: Hugging Face transformers inputs and caches, diffusers."""
