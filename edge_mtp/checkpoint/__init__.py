"""What a checkpoint is: its geometry (spec), tensor names (layout), config, location, reading and synthesis."""
