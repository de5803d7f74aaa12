"""``medivae anomaly score``: which images are scored against which normals (:mod:`.sets`), what is computed
(:mod:`.protocol`), the files (:mod:`.outputs`), and the command itself (:mod:`.score`). The scores, maps,
calibration and selection rules are in :mod:`medivae.evaluation.anomaly`; ``medivae anomaly adapt`` is
:mod:`medivae.workflows.site`."""
