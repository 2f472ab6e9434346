"""Command-line tools above the library (they may import models, util and data): the stand-in
builder (``python -m tools.standin``), the BFM UV map, the torch installer."""
