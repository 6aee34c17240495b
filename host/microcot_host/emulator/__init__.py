"""The platform emulator: a Cloud of Things on one machine (issue 3).

This package holds the broker layer (a real Mosquitto with TLS and seed 002's access control);
the SmartREST connector and the REST API build on it.
"""
