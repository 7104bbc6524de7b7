"""The layer that judges the others: parity levels, benchmarks, the diffusers reference sampler, the GPU check
and the int8 experiment. It may import everything (torch, diffusers, polygraphy); nothing imports it."""
