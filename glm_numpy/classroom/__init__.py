"""Classroom: the exercises as nbgrader assignments, graded part by part, and a class report.

    glm-numpy classroom init COURSE_DIR                  an nbgrader course (course.write_course)
    glm-numpy classroom report COURSE_DIR ASSIGNMENT...  points, diagnoses, common mistakes

In an assignment's test cells: ``check_part("rotary", rotary, "pairing")`` (parts.py). The
teacher's guide is docs/teaching.md. Modules: parts (partial credit), course (the nbgrader
course), report (the class report).
"""

from glm_numpy.classroom.parts import PARTS, PartResult, check_part

__all__ = ["PARTS", "PartResult", "check_part"]
