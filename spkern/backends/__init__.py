"""The backends, one file each: every file registers the ops its backend implements with
:func:`spkern.registry.register`, each with the check that says why it cannot run a call.
To add a backend: a file here, its name in ``spkern.registry.BACKENDS`` and ``ORDER``."""
