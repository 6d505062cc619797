"""Making and checking NVFP4 checkpoints: quality evaluation against the 16-bit model."""
