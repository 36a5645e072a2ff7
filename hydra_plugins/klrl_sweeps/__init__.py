"""klrl's Hydra plugins: a grid sweeper (a union of cartesian products, read from sweeps/NAME.yaml) and
submitit launchers that keep a sweep resumable and observable (see docs/sweeps.md)."""
