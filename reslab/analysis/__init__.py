"""The residual-learning lab: each study writes plots, raw numbers and summaries into a folder.

Every study module offers ``run`` (the library function), and ``HELP``, ``add_arguments`` and
``main`` for its command line (``reslab analyze STUDY``).
"""

from reslab.analysis import degradation, gradients, landscape, lesion, report, reproduce, responses

STUDIES = {
    "degradation": degradation,
    "gradients": gradients,
    "responses": responses,
    "landscape": landscape,
    "lesion": lesion,
    "report": report,
    "reproduce": reproduce,
}

__all__ = ["STUDIES", "degradation", "gradients", "landscape", "lesion", "report", "reproduce", "responses"]
