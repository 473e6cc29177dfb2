"""Teacher access modes: what the teacher returns about the student's completions."""

from opd.teachers.local import FullLogits, TeacherAccess
from opd.teachers.sampled import SampledLogprobs
from opd.teachers.topk import TAIL_ID, TopK

__all__ = ["TAIL_ID", "FullLogits", "SampledLogprobs", "TeacherAccess", "TopK"]
