"""Generation: the block-diffusion sampler (`sampler`), its per-step rules (`steps`) and the autoregressive
decoder of the same weights (`autoregressive`), a baseline that reads the encoder's next-token logits."""
