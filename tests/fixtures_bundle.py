"""Bundle fixtures: tiny random-init bundles exported once per session and shared."""
