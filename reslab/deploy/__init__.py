"""Deployment: BN folding, export with verification, int8 quantization and benchmarks."""

from reslab.deploy.fold import conv_bn_pairs, fold_batchnorm
from reslab.deploy.inputs import real_inputs

__all__ = ["conv_bn_pairs", "fold_batchnorm", "real_inputs"]
