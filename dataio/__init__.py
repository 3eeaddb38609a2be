"""Datasets: file readers and label formats, the dataset interface and its validation, the VOC and COCO layouts, the manifest, the synthetic generator."""
