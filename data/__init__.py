"""Datasets: a folder of photos with their detections (test.py); training data (train.py)."""
