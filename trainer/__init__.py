"""ddpm_deploy.trainer: the PyTorch trainer (UNet, presets, datasets, training loop, checkpoints, `ddpm-train`)."""
