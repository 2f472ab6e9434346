"""Pure helpers: alignment, image and mesh I/O, visualisation, asset checks."""
