"""eval stage (not built yet)."""
