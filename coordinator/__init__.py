"""fedclip.coordinator: rounds, aggregation, registry, rollout and the `fedclip-coord` CLI."""
