"""The package version, apart from the package's entry so that every module can name it."""

__version__ = "0.1.0"
