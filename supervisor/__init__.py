"""assessment-runtime supervisor: sync, spec store, job manager, control socket."""

__version__ = "0.1.0"
