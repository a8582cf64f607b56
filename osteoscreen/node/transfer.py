"""Transfer syntaxes the node accepts; every one of them is decoded by the worker (pydicom with
pylibjpeg-libjpeg for JPEG and JPEG-LS, pylibjpeg-openjpeg for JPEG 2000, pydicom's own RLE and deflate)."""
from pydicom import uid

ACCEPTED_TRANSFER_SYNTAXES = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
]
