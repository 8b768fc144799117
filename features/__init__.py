"""features stage (not built yet)."""
