"""Values that both ``config`` and the model families check against; here so neither imports the other
for them (``config`` builds a family's config through ``models``, never the reverse)."""

IMAGE_SIZES = (32, 64, 128, 256)  # square side in pixels: the convolutional trunks halve it to 4
LIKELIHOODS = ("bernoulli", "gaussian", "discretized_logistic")
DEFAULT_FAMILY = "conv_vae"  # the article's VAE: what `medivae train` builds without --model
