"""osteoscreen: a DICOM node for opportunistic osteoporosis screening (demonstration, not diagnosis)."""
__version__ = "0.1.0"
