"""Region proposals: selective search, MultiBox, their combination and recall (stage=proposals, stage=multibox)."""
