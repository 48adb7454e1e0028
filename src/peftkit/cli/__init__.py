"""The `peftkit` command line (entry point: peftkit.cli.main:main)."""
