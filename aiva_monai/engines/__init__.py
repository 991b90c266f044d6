"""The adaptation trainers: one base (``AdaptationTrainer``: target stream, resumable positions, the
iteration's sequence, AMP) and one small module per method. AdaBN is a function
(``aiva_monai.batchnorm.adapt_batchnorm``); which method reads target labels is said in ``aiva_monai.methods``.
"""

from aiva_monai.engines.adaptsegnet import AdaptSegNetTrainer, OutputDiscriminator
from aiva_monai.engines.aiva import AIVATrainer, ClusterAssignment
from aiva_monai.engines.base import AdaptationTrainer, default_seg_loss, full_precision
from aiva_monai.engines.oracle import OracleTrainer
from aiva_monai.engines.segjdot import SegJDOTTrainer

__all__ = [
    "AdaptationTrainer",
    "AIVATrainer",
    "ClusterAssignment",
    "AdaptSegNetTrainer",
    "OutputDiscriminator",
    "SegJDOTTrainer",
    "OracleTrainer",
    "default_seg_loss",
    "full_precision",
]
