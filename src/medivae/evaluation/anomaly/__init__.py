"""Anomaly detection with a model fitted on normal images only (An & Cho 2015; Baur et al. 2021).

How it is organised. Everything turns on one concept, the *scorer* (:mod:`.scorers`): a name, what it needs
(capabilities of the family, e.g. "likelihood" or "heal", and statistics of the training normals) and a
function from a scoring pass to per-image scores (N,) and, where it has one, a pixel map (N, H, W). A pass
(:mod:`.passes`) is one model over one set of images, computing reconstructions, codes, likelihood bounds and
SSIM once for every scorer; a conditional family is given the normal class for every image, so labels reach
metrics only. Around the scorers, one module per step:

- :mod:`.normative`: what normal looks like, fitted on the training normals (latent Gaussian and mixture,
  per-pixel SSIM statistics);
- :mod:`.calibration`: z-scores on training normals, and the conformal threshold on other normals;
- :mod:`.maps` and :mod:`.restoration`: the maps that need more than the pass (input gradient, MAP restoration);
- :mod:`.synthetic` and :mod:`.selection`: kinds of synthetic anomaly made from validation normals, the tuned
  hyperparameters on one half of them and the default score by its mean rank over kinds on the other, the
  leave-one-kind-out check;
- :mod:`.detection`: AUROC / AUPRC and the trivial baselines (directions fixed on validation data);
- :mod:`.localisation` and :mod:`.shift`: pixel-level metrics against masks, and whether scored normals are like
  the training ones.

These are functions of arrays and a model. What ``medivae anomaly score`` does with them (which images, which
normals, the order of the steps, the files and ``results.json["anomaly"]``) is :mod:`medivae.workflows.anomaly`;
the report section is :mod:`medivae.report.anomaly`. A new score is one :class:`.scorers.Scorer` in
:data:`.scorers.SCORERS`; it is then scored, standardised, compared in the selection and written like the others.
"""
