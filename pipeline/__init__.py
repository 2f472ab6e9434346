"""Runs built on the models: image sets (:mod:`pipeline.image_sets`) and video (:mod:`pipeline.video`).

Layering: pipeline sits above models, util and data (it may import them) and below the CLI
scripts (test.py); nothing in models, util or data imports pipeline.
"""
