"""Command-line options: dataclasses with the original's flag names and defaults, turned into argparse."""
