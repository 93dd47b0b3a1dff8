"""Graph passes: one module per pass, registered by its module name."""
