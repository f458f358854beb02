"""Data lifecycle: image I/O, stage-output contracts, alignment, and the register, crop and stats stages."""
