"""The package version, in a module of its own: anything may import it without importing the package's
``__init__`` (whose ``load`` reaches up to :mod:`medivae.runfolder.run`)."""

__version__ = "0.1.0"
