"""File formats that pass between stages: CAM files, the pseudo-mask HDF5 file, saliency maps, label PNGs and the palette."""
