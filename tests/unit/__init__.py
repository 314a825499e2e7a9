"""fedmira tests."""
