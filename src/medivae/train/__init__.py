"""Training: the loop (trainer), its epoch log (metrics), checkpoint folders and augmentation."""
