"""Generation: many seeded samples per prompt from a diffusers text-to-image pipeline."""
