"""The algorithms of the zoo: one module per algorithm (or family of registered variants)."""
