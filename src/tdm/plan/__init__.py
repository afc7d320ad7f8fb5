"""`tdm plan`: parameters, memory per GPU, FLOPs and time per iteration of a preset, counted on the meta device."""
