"""The continued-pretraining runner: config, data, evaluation, parameter groups, checkpoints, the loop."""
