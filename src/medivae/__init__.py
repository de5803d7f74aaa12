"""medivae: variational autoencoders for medical images.

Nothing heavy runs at import; the Python API lives in :mod:`medivae.api`.
"""

from medivae.runtime.version import __version__

__all__ = ["__version__", "load"]


def load(run_dir, which: str = "best", device: str = "auto"):
    """Open a run folder for notebooks: ``run.encode/decode/sample/reconstruct`` return tensors
    (:class:`medivae.runfolder.run.Run`)."""
    from medivae.runfolder.run import load_run

    return load_run(run_dir, which, device)
