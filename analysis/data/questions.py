"""Questions about images, as VQAv2 lays them out: a JSON Lines file (one object a line: ``image``, a file name in
the images folder; ``question``; ``answers``, the annotators' answers, optional) over a folder of images (or
images given in memory), as a torch Dataset that the dataset CLI shards and the app streams alike.

``answers`` may be a list of strings or VQAv2's own list of ``{"answer": ...}`` objects; ``question_id`` is kept
when given. A question without answers is scored by agreement with the unreduced model instead.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from analysis.data.folders import NO_LABEL, Batch, DatasetError
from analysis.data.images import ImageError, load_image

QUESTIONS_FIELDS = ("image", "question", "answers")


@dataclass(frozen=True)
class Question:
    image: str  # relative to the images folder, as the questions file writes it
    question: str
    answers: tuple[str, ...] = ()  # the annotators' answers; empty: none given
    question_id: str = ""


def _answers(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise DatasetError(f"{where}: 'answers' must be a list of the annotators' answers, not {type(value).__name__}.")
    answers = []
    for item in value:
        text = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise DatasetError(f"{where}: each answer must be a string or an object with an 'answer' string.")
        answers.append(text)
    return tuple(answers)


def _question(line: str, where: str) -> Question:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where} is not JSON ({exc.msg}, column {exc.colno}).") from None
    if not isinstance(item, dict):
        raise DatasetError(f"{where} is not a JSON object with {', '.join(QUESTIONS_FIELDS)}.")
    image, question = item.get("image"), item.get("question")
    if not isinstance(image, str) or not image.strip():
        raise DatasetError(f"{where} has no 'image' (the image's file name in the images folder).")
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where} has no 'question' text.")
    qid = item.get("question_id", "")
    return Question(image.strip(), question.strip(), _answers(item.get("answers"), where), str(qid))


def parse_questions(text: str, source: str = "the questions file", limit: int | None = None) -> list[Question]:
    """The questions of a JSON Lines text (blank lines skipped); DatasetError naming the line otherwise."""
    questions = [_question(line, f"{source}, line {number}")
                 for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not questions:
        raise DatasetError(f"{source} holds no questions (JSON Lines: one object a line with "
                           f"{', '.join(QUESTIONS_FIELDS)}).")
    return questions[:limit] if limit is not None else questions


def read_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such questions file.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} cannot be read as UTF-8 text ({exc}).") from None
    return parse_questions(text, str(path), limit)


def _missing_images(questions: Sequence[Question], found: Callable[[str], bool], where: str) -> None:
    missing = sorted({q.image for q in questions if not found(q.image)})
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DatasetError(f"{len(missing)} image(s) the questions name are not in {where}: {shown}.")


class QuestionImages(Dataset):
    """One item per question: ``(index, image or None, ok)``; an unreadable image is flagged, not raised.

    Images come from ``root`` (a folder) or from ``images`` (name -> PIL image, matched by file name or stem);
    ``collate`` runs the model's processor over a batch: the model's inputs, the dataset indices, the skipped ones.
    With processors at several input sizes (``with_processors``), it runs each over the batch's images (kept only
    while the batch is built): the batch's ``images`` are the inputs by size (None: the default processor's).
    """

    def __init__(self, questions: Sequence[Question], processor: Callable, root: str | Path | None = None,
                 images: Mapping[str, Image.Image] | None = None, questions_file: str | Path | None = None):
        self.questions = list(questions)
        self.processor = processor
        self.processors: dict[int | None, Callable] = {None: processor}
        self.root = Path(root).expanduser().resolve() if root is not None else Path("(uploaded images)")
        self.images = None if images is None else {**{Path(k).stem: v for k, v in images.items()}, **images}
        self.questions_file = Path(questions_file).expanduser().resolve() if questions_file else None
        if images is None:
            if not self.root.is_dir():
                raise DatasetError(f"{root} is not a folder.")
            _missing_images(self.questions, lambda name: (self.root / name).is_file(), str(self.root))
        else:
            _missing_images(self.questions, self._in_memory, "the uploaded images")

    @classmethod
    def from_files(cls, images_folder: str | Path, questions_file: str | Path, processor: Callable,
                   limit: int | None = None) -> "QuestionImages":
        return cls(read_questions(questions_file, limit), processor, images_folder, questions_file=questions_file)

    def with_processors(self, processors: Mapping[int | None, Callable]) -> "QuestionImages":
        """The same questions and images, processed by each of ``processors`` (input size -> processor; None: the
        default size, which must be there)."""
        if None not in processors:
            raise ValueError("The processors must include the default size's (key None).")
        sized = copy.copy(self)
        sized.processor, sized.processors = processors[None], dict(processors)
        return sized

    def _in_memory(self, name: str) -> bool:
        return name in self.images or Path(name).stem in self.images

    @property
    def has_answers(self) -> bool:
        return any(q.answers for q in self.questions)

    def __len__(self) -> int:
        return len(self.questions)

    def path(self, index: int) -> str:
        return f"{self.questions[index].image} (question {index + 1})"

    def image(self, index: int) -> Image.Image:
        """The question's image (RGB); ImageError when it cannot be read."""
        name = self.questions[index].image
        if self.images is not None:
            return self.images.get(name) or self.images[Path(name).stem]
        return load_image(self.root / name).image

    def __getitem__(self, index: int) -> tuple[int, Image.Image | None, bool]:
        try:
            return index, self.image(index), True
        except ImageError:
            return index, None, False

    def inputs(self, samples: Sequence[tuple[int, Image.Image | None, bool]], size: int | None = None) -> dict:
        """The processor's inputs (of the processor at ``size``) for readable samples, padded to the longest
        question."""
        return dict(self.processors[size](images=[s[1] for s in samples],
                                          text=[self.questions[s[0]].question for s in samples],
                                          padding="longest", truncation=True, return_tensors="pt"))

    def collate(self, samples: Sequence[tuple[int, Image.Image | None, bool]]) -> Batch:
        """The inputs of the readable samples at every size (``{size: inputs}``, None: the default size), and the
        rest by index."""
        good = [s for s in samples if s[2]]
        indices = torch.tensor([s[0] for s in good], dtype=torch.long)
        inputs = {size: self.inputs(good, size) for size in self.processors} if good else {}
        return Batch(inputs, torch.full((len(good),), NO_LABEL), indices, [s[0] for s in samples if not s[2]])

    def table(self) -> list[list]:
        """[name, size, mtime in ns, label] of the questions file and every image it names: what a resume must find."""
        rows = []
        if self.questions_file is not None:
            stat = self.questions_file.stat()
            rows.append([f"questions:{self.questions_file.name}", stat.st_size, stat.st_mtime_ns, NO_LABEL])
        if self.images is None:
            for name in sorted({q.image for q in self.questions}):
                stat = (self.root / name).stat()
                rows.append([name, stat.st_size, stat.st_mtime_ns, NO_LABEL])
        return rows
