"""The residual-learning lab: each study writes plots, raw numbers and summaries into a folder."""

from reslab.analysis import degradation, gradients, landscape, lesion, report, responses

__all__ = ["degradation", "gradients", "landscape", "lesion", "report", "responses"]
