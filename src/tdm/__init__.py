"""tdm: distil many-step diffusion models into few-step students by Trajectory Distribution Matching."""

__version__ = "0.1.0"
