"""Constitutional AI stages: constitution, prompt sources, revisions, feedback labeller, PMP data."""
