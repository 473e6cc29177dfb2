"""Which teacher/student pairs may differ in tokenizer, and the `Models` such a pair gets.

A pair whose tokenizers map tokens to ids differently is accepted only when the run's
method asks the teacher through a cross-tokenizer access (one whose class sets
`cross_tokenizer = True`, e.g. `CrossTokenizerLogprobs` of the `xtok_*` recipes); any other
method is refused at build time with one line naming those recipes. The pair then gets
`Models(tokenizer=student's, teacher_tokenizer=teacher's, vocab_size=the student's head)`:
the student's tokenizer drives sampling, data and the loss; the teacher's is only used to
re-tokenise text for the teacher.
"""

from __future__ import annotations

from opd.errors import ModelError


def same_vocabulary(tok_a, tok_b) -> bool:
    """True when both tokenizers map every token string to the same id."""
    return tok_a is tok_b or tok_a.get_vocab() == tok_b.get_vocab()


def is_cross_tokenizer(method) -> bool:
    """Whether `method`'s teacher access handles a teacher with another tokenizer."""
    return bool(getattr(method.teacher, "cross_tokenizer", False))


def cross_tokenizer_recipes() -> list[str]:
    """Names of the registered recipes whose teacher access is cross-tokenizer."""
    from opd.recipes import RECIPES

    out = []
    for name, info in sorted(RECIPES.items()):
        try:
            if is_cross_tokenizer(info.build()):
                out.append(name)
        except Exception:  # noqa: BLE001 - a recipe that needs arguments is not listed
            continue
    return out


def refusal(
    student_spec: str, teacher_spec: str, recipe: str, student_tok=None, teacher_tok=None
) -> ModelError:
    """The one-line error for a pair with differing tokenizers and a same-tokenizer recipe."""
    names = ", ".join(f"recipe={n}" for n in cross_tokenizer_recipes())
    sizes = ""
    if student_tok is not None and teacher_tok is not None:
        sizes = f": student {len(student_tok)} tokens, teacher {len(teacher_tok)} tokens"
    return ModelError(
        f"model.student '{student_spec}' and model.teacher '{teacher_spec}' have different "
        f"tokenizers (they map tokens to ids differently{sizes}), and recipe {recipe!r} needs "
        f"a shared vocabulary; use a cross-tokenizer recipe ({names}) or a student with the "
        "teacher's tokenizer"
    )


def check_pair(models, method, cfg) -> None:
    """Refuse `Models` with a teacher tokenizer of its own unless `method` is cross-tokenizer
    (models given in code; `opd.build.build_models` checks the ones it builds)."""
    if getattr(models, "teacher_tokenizer", None) is None or is_cross_tokenizer(method):
        return
    student = cfg.model.student or "(given in code)"
    teacher = cfg.model.teacher or "(given in code)"
    raise refusal(student, teacher, method.name, models.tokenizer, models.teacher_tokenizer)


def cross_tokenizer_models(cfg, method, teacher, student, student_tok, teacher_tok, ensemble=False):
    """`opd.build.Models` for a pair with differing tokenizers (refused unless `method` is
    cross-tokenizer; a teacher ensemble is refused too)."""
    from opd.build import Models
    from opd.models import decoder_and_head, shared_vocab_size
    from opd.teachers.ensemble import TeacherEnsemble

    if not is_cross_tokenizer(method):
        raise refusal(
            cfg.model.student, cfg.model.teacher, cfg.method.recipe, student_tok, teacher_tok
        )
    if ensemble or isinstance(teacher, TeacherEnsemble):
        raise ModelError(
            f"model.teacher '{cfg.model.teacher}': a teacher ensemble cannot be combined with "
            "a student of another tokenizer; name one teacher"
        )
    teacher.eval()
    teacher.requires_grad_(False)
    student.train()
    for model in (teacher, student):
        decoder_and_head(model, verify=True)
    shared_vocab_size(teacher, teacher_tok, teacher, teacher_tok)  # head covers its tokenizer
    vocab = shared_vocab_size(student, student_tok, student, student_tok)
    return Models(teacher, student, student_tok, vocab, teacher_tokenizer=teacher_tok)
