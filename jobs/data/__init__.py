"""Training data: the plan the driver makes before compute (plan), the Ray Data pipeline
that decodes and streams images to the workers (pipeline), synthetic datasets (synth)."""
