"""The experiments stage: the seed protocol, weight maps, balancing, clash maps and mix export.
See docs/architecture.md."""
