"""The ``trellis-export`` command line (installed as ``trellis_export.cli``)."""
