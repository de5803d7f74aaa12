"""Every anomaly score, one :class:`Scorer` each: a name, what it needs, and a function -> scores and a map.

Per-image scores, higher = more anomalous:
  ``neg_elbo``        -log p(x|z) averaged over K posterior draws + the closed-form KL (nats);
  ``iwae``            the importance-weighted bound on -log p(x), same K draws (Burda et al. 2016);
  ``rec_error``       mean squared error between x and its reconstruction (map: the residual |x - x̂|);
  ``ssim``            1 - SSIM(x, reconstruction) (Wang et al. 2004): structure, not brightness;
  ``kl``              KL(q(z|x) || p(z)) where the family has it in closed form;
  ``iwae_minus_png``  iwae minus the image's PNG size in nats: the input-complexity correction of Serrà et al.
                      2020, since simple images are likely under any model (Nalisnick et al. 2019). Both terms
                      must be code lengths of the 8-bit image, so only under a discrete image likelihood;
  ``latent``          squared Mahalanobis distance of the posterior mean from the training normals' codes;
  ``latent_gmm``      -log density of the posterior mean under a Gaussian mixture of the normal codes;
  ``feature_res``     distance between the reference network's content features of x and of its reconstruction:
                      blur costs little in a feature space trained to ignore it;
  ``ssim_z``          the SSIM map as z-scores of the training normals' maps, mean of the positive part;
  ``restoration``     MAP restoration (Chen et al. 2020; :mod:`.restoration`), its TV weight tuned;
  ``vq_healing``      prior-guided healing (Pinaya et al. 2022): the family's ``heal`` hook, mean |x - healed|,
                      its threshold tuned;
  ``diffusion_healing`` diffusion healing (Pinaya et al. 2022, their diffusion model): the latent noised to a
                      fraction of the schedule and denoised by DDIM under the run's diffusion prior (ldm's own,
                      or a fitted diffusion sampler: :mod:`medivae.models.healing`), decoded; mean |x - healed|,
                      the fraction tuned; the same seeded noise for an image whatever its batch;
and the family's own scores (``anomaly_scores`` hook, e.g. a VAE-GAN's ``disc``). ``combined`` and ``ensemble``
(:mod:`.calibration`) average z-scores of these.

A scorer's ``needs`` are capabilities of the family (:data:`medivae.models.family.CAPABILITIES`),
``"normals"`` (statistics of the training normals, :mod:`.normative`) and ``"diffusion"`` (a diffusion prior of
the run, :attr:`.passes.Scoring.diffusion`). Its function gets the scoring pass of a
set of images (:class:`.passes.ImagePass`), those statistics and, for a scorer with a ``grid``, one value of its
hyperparameter, and returns (scores (N,), map (N, H, W) or None), or None where the family lacks what it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medivae.evaluation.anomaly.normative import Normals, latent_gmm_score, mahalanobis, normative_ssim
from medivae.evaluation.anomaly.passes import ImagePass
from medivae.evaluation.anomaly.restoration import TV_GRID, restoration_scores
from medivae.models.family import describe, has, heal
from medivae.runtime.seeding import torch_generator

HEALING_THRESHOLDS = (0.001, 0.01, 0.05)  # Pinaya et al. 2022 used 0.005
# fractions of the diffusion schedule noised to: too little heals nothing, too much forgets the image
HEALING_FRACTIONS = (0.1, 0.25, 0.5)
COMBINED_FROM = ("ssim", "iwae_minus_png")  # the pre-registered ``combined`` score, the one the threshold is on
ENSEMBLE_FROM = ("ssim", "rec_error", "latent_gmm", "feature_res", "restoration", "vq_healing",
                 "diffusion_healing", "disc")

Scored = tuple[np.ndarray, np.ndarray | None]


@dataclass(frozen=True)
class Scorer:
    """``fn(pass, normals, value) -> (scores (N,), map (N, H, W) or None) or None``; ``grid``: the values of
    the hyperparameter ``param`` (tuned on synthetic anomalies) or () for none; ``map_name``: what its map is
    called in maps.npz and the report."""

    name: str
    needs: frozenset[str]
    fn: Callable[[ImagePass, Normals | None, float | None], Scored | None]
    map_name: str | None = None
    param: str | None = None
    grid: tuple[float, ...] = ()

    def available(self, model, normals: Normals | None, diffusion=None) -> bool:
        """Whether the family (``model``), the training normals' statistics and the run's diffusion prior
        (None: none) allow this score."""
        caps = self.needs - {"normals", "diffusion"}
        return (all(has(model, c) for c in caps) and ("normals" not in self.needs or normals is not None)
                and ("diffusion" not in self.needs or diffusion is not None))


def _bound(name: str):
    def fn(p: ImagePass, normals, value) -> Scored | None:
        v = p.bounds.get(name)
        return None if v is None else (v, None)

    return fn


def _iwae_minus_png(p: ImagePass, normals, value) -> Scored | None:
    if not describe(p.ctx.model).discrete_likelihood:  # a density or a Bernoulli on gray values is no code length
        return None
    return p.bounds["iwae"] - p.png_nats, None


def _latent_gmm(p: ImagePass, normals: Normals, value) -> Scored | None:
    return None if normals.gmm is None else (latent_gmm_score(p.codes, normals.gmm), None)


def _feature_res(p: ImagePass, normals: Normals, value) -> Scored | None:
    """||f(x) - f(x_hat)||_2 / sqrt(D) in the reference network's own features (not the detail block, which a
    reconstruction's blur would fill for normal and anomalous images alike)."""
    if normals.reference is None:
        return None
    fx, fr = normals.reference.content_features(p.images), normals.reference.content_features(p.recon)
    return np.linalg.norm(fx - fr, axis=1) / np.sqrt(fx.shape[1]), None


def _ssim_z(p: ImagePass, normals: Normals, value) -> Scored | None:
    return None if normals.ssim_norm is None else normative_ssim(p.ssim[1], normals.ssim_norm)


def healing_scores(p: ImagePass, threshold: float) -> Scored:
    """VQ healing score (N,) (mean |x - healed|) and map (N, H, W) of a pass; the family's precision."""
    model = p.ctx.model
    maps = p.ctx.batches(lambda x, y: (x - heal(model, x, y, threshold)).abs().mean(1).float(), p.x, p.y,
                         f"VQ healing (threshold {threshold:g}) of {p.name}").numpy()
    return maps.reshape(len(maps), -1).mean(1, dtype=np.float64), maps


def diffusion_healing_scores(p: ImagePass, fraction: float) -> Scored:
    """Diffusion healing score (N,) (mean |x - healed|) and map (N, H, W) of a pass at t_start = ``fraction`` of
    the schedule (:meth:`medivae.models.healing.LatentDiffusion.heal`). The noise is drawn for the whole set from
    the scoring seed, so a score does not depend on the batch size, and image i of two sets gets the same noise
    (a synthetic anomaly and the normal it was made from differ by the image only)."""
    prior, ctx = p.ctx.diffusion, p.ctx
    noise = prior.noise(len(p), torch_generator(ctx.seed, "diffusion-healing"))
    done = 0

    def residual(x, y):
        nonlocal done
        healed = prior.heal(x, y, fraction, noise[done : done + len(x)])
        done += len(x)
        return (x.float() - healed).abs().mean(1)

    maps = ctx.batches(residual, p.x, p.y, f"diffusion healing (t_start {fraction:g} T) of {p.name}").numpy()
    return maps.reshape(len(maps), -1).mean(1, dtype=np.float64), maps


SCORERS: tuple[Scorer, ...] = (
    Scorer("neg_elbo", frozenset({"likelihood"}), _bound("neg_elbo")),
    Scorer("iwae", frozenset({"likelihood"}), _bound("iwae")),
    Scorer("rec_error", frozenset(), lambda p, n, v: (p.squared_error, p.residual), "residual"),
    Scorer("ssim", frozenset(), lambda p, n, v: p.ssim, "ssim"),
    Scorer("kl", frozenset({"likelihood"}), _bound("kl")),
    Scorer("iwae_minus_png", frozenset({"likelihood"}), _iwae_minus_png),
    Scorer("latent", frozenset({"normals"}), lambda p, n, v: (mahalanobis(p.codes, n.gauss), None)),
    Scorer("latent_gmm", frozenset({"gaussian_latent", "normals"}), _latent_gmm),
    Scorer("feature_res", frozenset({"normals"}), _feature_res),
    Scorer("ssim_z", frozenset({"normals"}), _ssim_z, "ssim_z"),
    Scorer("restoration", frozenset({"likelihood"}), lambda p, n, v: restoration_scores(p, v), "restoration",
           "tv", TV_GRID),
    Scorer("vq_healing", frozenset({"heal"}), lambda p, n, v: healing_scores(p, v), "vq_healing", "threshold",
           HEALING_THRESHOLDS),
    Scorer("diffusion_healing", frozenset({"diffusion"}), lambda p, n, v: diffusion_healing_scores(p, v),
           "diffusion_healing", "t_start_fraction", HEALING_FRACTIONS),
)


def available(model, normals: Normals | None, diffusion=None) -> list[Scorer]:
    """The scorers this family, these normal statistics and the run's diffusion prior (None: none) allow, in
    :data:`SCORERS` order."""
    return [s for s in SCORERS if s.available(model, normals, diffusion)]


def score_pass(p: ImagePass, normals: Normals | None, params: dict[str, float], only=None,
               maps: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every available scorer (only those named in ``only`` when given) on one pass, tuned ones at their value in
    ``params`` (a tuned scorer without one is left out), and the family's own scores: ({name: (N,)},
    {map name: (N, H, W)})."""
    scores, out_maps = {}, {}
    for s in available(p.ctx.model, normals, p.ctx.diffusion):
        if (only is not None and s.name not in only) or (s.grid and s.name not in params):
            continue
        got = s.fn(p, normals, params.get(s.name))
        if got is None:
            continue
        scores[s.name] = np.asarray(got[0], dtype=np.float64)
        if maps and s.map_name and got[1] is not None:
            out_maps[s.map_name] = got[1]
    if only is None:
        scores.update(p.family_scores)
    else:
        scores.update({n: v for n, v in p.family_scores.items() if n in only})
    return scores, out_maps
