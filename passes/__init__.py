"""Graph passes: one module per pass, each a `(graph, ctx) -> graph` rewrite (see ARCHITECTURE.md)."""
