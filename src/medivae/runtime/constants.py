"""Values that both ``config`` and the model families check against; here so neither imports the other
for them (``config`` builds a family's config through ``models``, never the reverse)."""

IMAGE_SIZES = (32, 64, 128, 256)  # square side in pixels: the convolutional trunks halve it to 4
LIKELIHOODS = ("bernoulli", "gaussian", "discretized_logistic")
DEFAULT_FAMILY = "conv_vae"  # the article's VAE: what `medivae train` builds without --model

# Defaults and limits every command shares (docs/guide/safety-limits.md lists them for users).
BOOTSTRAP_RESAMPLES = 1000  # resamples of every 95 % bootstrap interval and paired p-value (--bootstrap)
MAX_GRID_IMAGES = 1024  # images in one PNG/JPEG grid (32 x 32 tiles); more go to a folder, one file each
MAX_SAMPLES = 100_000  # images one `sample` or `synthesize` call draws (generated and written in batches)
MAX_ROW_IMAGES = 64  # images in one row of a figure: reconstruct -n, interpolate/traverse --steps, --n-maps
MAX_THREADS = 1024  # --threads: more only oversubscribes; 100 000 ran the process out of threads (a segfault)
MAX_PHANTOMS = 100_000  # phantoms:N (N x size^2 bytes in memory: 410 MB at 64 px)
CHECKPOINTS = ("best", "last")  # the checkpoints of a run folder that --checkpoint / load(which=...) may name
