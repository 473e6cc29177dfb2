"""Teacher access modes: what the teacher returns about the student's completions."""

from opd.teachers.local import FullLogits, TeacherAccess

__all__ = ["FullLogits", "TeacherAccess"]
