"""proposals stage (not built yet)."""
