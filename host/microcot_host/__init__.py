"""Host tooling for microcot: virtual boards, deploy, flashing, provisioning, emulators."""

__version__ = "0.1.0"
