"""Suggesting a mapping (docs/design.md section 18): names, match, compress, result."""
