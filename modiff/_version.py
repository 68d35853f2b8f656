"""The package version (one place; `modiff.__version__` and run manifests read it)."""
__version__ = "0.1.0"
