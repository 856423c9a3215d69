"""Twin-Merging building blocks: low-rank exclusive experts and layers that route them per input row."""
