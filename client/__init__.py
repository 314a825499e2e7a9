"""fedmira's Flower ClientApp: what runs at each hospital (SuperNode)."""
