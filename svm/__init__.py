"""svm stage (not built yet)."""
