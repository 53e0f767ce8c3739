"""Shared test helpers: namespaces, a recording backend, running the CLI."""
