"""The method-agnostic core: registry, config, targeting, injection, PeftModel, merge and checkpoint I/O."""
