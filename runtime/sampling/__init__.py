"""The sampling layer: step plans, the step rule, per-image state and the loops that drive a runner."""
