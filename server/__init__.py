"""fedmira's Flower ServerApp and strategies: what runs at the coordinator."""
