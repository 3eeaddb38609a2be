"""Datasets: file readers, label formats, the dataset interface and its validation, VOC and COCO, the manifest, the generator."""
