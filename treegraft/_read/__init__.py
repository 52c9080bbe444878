"""Read step: lazy sources that read only the leaves a plan asks for."""
