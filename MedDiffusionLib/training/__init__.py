"""Training utilities: small autoencoders (for bundled demo models), diffusion and ControlNet training."""
