"""CLI command groups; each module exposes ``register(app)`` and flows/cli.py wires them in."""
