"""``maskstore build``: filled in by the scoring pipeline."""
