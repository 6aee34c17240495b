# microcot: Cloud of Things device firmware. Submodules are imported on demand to keep the heap small.
__version__ = "0.1.0"
