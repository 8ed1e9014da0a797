"""Sweeps: the spec (spec), composing each run's config (compose), the driver that launches the stages
(driver) and the live status table (status). `python -m harness.sweep SPEC.yaml` runs the driver."""
