"""Below everything: devices and precision, torchrun, seeding, atomic file writes, errors, PNG grids."""
