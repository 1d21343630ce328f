"""Small, self-contained studies that reproduce a paper's claim on bundled or generated data."""
