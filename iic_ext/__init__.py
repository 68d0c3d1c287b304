"""iic_ext: Inter-Intra Contrastive (IIC) self-supervised video representation learning, fast.

Subpackages: :mod:`iic_ext.ops` (fused kernels and their references), :mod:`iic_ext.models`
(C3D, R3D, R(2+1)D, R3D-18, I3D, S3D-G and torchvision's video ResNets, one registry), :mod:`iic_ext.data` (UCF101, HMDB51, synthetic), :mod:`iic_ext.nce`
(memory-bank contrast and losses), and the commands ``python -m iic_ext.train``,
``python -m iic_ext.retrieve``, ``python -m iic_ext.finetune``.
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402,F401
