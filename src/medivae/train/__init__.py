"""Training: the loop (trainer), checkpoint folders, devices and precision, distributed helpers."""
