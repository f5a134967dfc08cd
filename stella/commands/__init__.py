"""Subcommands of the `stella` CLI, one module each."""
