"""distill: produce Caprese adapter checkpoints (data generation, fitting, evaluation report)."""
