"""From model output to what the caller receives: masks in the input's geometry, clean-up, measurements, files."""
