"""CLI command groups. Each module has ``add(subparsers)`` and sets ``func`` on its parsers."""
