"""On-disk formats: domain checkpoints, concept files, exports. Safetensors + JSON only."""
