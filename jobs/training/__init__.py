"""Training: the backbone registry (backbones) and models (model), the numerical steps
(steps), the per-worker loop (loop), checkpoints and their uploads (checkpoints, upload),
the Ray Train run (trainer) and the exported model (export)."""
