"""Training: the command line (cli), the trainer loop, the DeepSpeed engine, checkpoints, EMAs, seeding
and the run directory. `python -m harness.train KEY=VALUE ...` runs harness.train.cli."""
