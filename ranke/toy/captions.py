"""Caption grammar of the toy world, and its exact inverse.

Grammar (each object is "<article> <size> <colour> <shape>", e.g. "a large red circle"):

    1 object : "a A" | "a picture of a A" | "one A" | "a single A"
    2 objects: "a A <rel> a B" | "a B <converse rel> a A" | "two objects: a A <rel> a B" | "a A is <rel> a B"
    3 objects: "a A, a B and a C" | "three objects: a A, a B and a C" | "a B, a C and a A"
               | "a picture of a A, a B and a C"

with <rel> one of "to the left of", "to the right of", "above", "below". The caption of a scene is
deterministic given (scene, phrasing index). `parse_caption` reads every phrasing back (it also
accepts any article on any object, upper case and a final full stop).
"""

from __future__ import annotations

from dataclasses import dataclass

from ranke.toy.scenes import COLORS, SHAPES, SIZES, ObjectSpec, Scene

NUM_PHRASINGS = 4

RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

_PHRASINGS = {
    1: ("a {0}", "a picture of a {0}", "one {0}", "a single {0}"),
    2: ("a {0} {rel} a {1}", "a {1} {converse} a {0}", "two objects: a {0} {rel} a {1}", "a {0} is {rel} a {1}"),
    3: ("a {0}, a {1} and a {2}", "three objects: a {0}, a {1} and a {2}", "a {1}, a {2} and a {0}",
        "a picture of a {0}, a {1} and a {2}"),
}
_PREFIXES = {("a", "picture", "of"): None, ("two", "objects", ":"): 2, ("three", "objects", ":"): 3}
_ARTICLES = (("a", "single"), ("a",), ("one",))


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for: objects, and for two objects a relation (i, name, j)."""

    objects: tuple[ObjectSpec, ...]
    relation: tuple[int, str, int] | None = None

    @classmethod
    def from_scene(cls, scene: Scene) -> "CaptionSpec":
        return cls(tuple(obj.spec for obj in scene.objects), scene.relation)

    def canonical(self) -> "CaptionSpec":
        """The same request in a unique form: relations read "left of"/"above" with the
        subject first; without a relation the objects are sorted (their order means nothing)."""
        if self.relation is None:
            rank = {name: i for i, name in enumerate(SHAPES + COLORS + SIZES)}
            ordered = sorted(self.objects, key=lambda o: (rank[o.shape], rank[o.color], rank[o.size]))
            return CaptionSpec(tuple(ordered))
        subject, name, other = self.relation
        if name in ("right of", "below"):
            subject, name, other = other, CONVERSE[name], subject
        return CaptionSpec((self.objects[subject], self.objects[other]), (0, name, 1))


def caption_words(text: str) -> list[str]:
    """Lower-case word tokens of a caption; "," and ":" are tokens of their own, a final "." is dropped."""
    text = text.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    return text.replace(",", " , ").replace(":", " : ").split()


def _join(words: list[str]) -> str:
    return " ".join(words).replace(" ,", ",").replace(" :", ":")


def _object_phrase(spec: ObjectSpec) -> str:
    return f"{spec.size} {spec.color} {spec.shape}"


def describe(spec: CaptionSpec, phrasing: int = 0) -> str:
    """Caption text for a spec with phrasing index in [0, NUM_PHRASINGS)."""
    if not 0 <= phrasing < NUM_PHRASINGS:
        raise ValueError(f"phrasing must be in [0, {NUM_PHRASINGS}), got {phrasing}")
    count = len(spec.objects)
    if count == 2 and spec.relation is None:
        raise ValueError("two-object captions need a relation")
    if count == 2:
        subject, name, other = spec.relation
        phrases = [_object_phrase(spec.objects[subject]), _object_phrase(spec.objects[other])]
        template = _PHRASINGS[2][phrasing]
        return template.format(*phrases, rel=RELATION_WORDS[name], converse=RELATION_WORDS[CONVERSE[name]])
    if count not in _PHRASINGS:
        raise ValueError(f"captions describe 1 to 3 objects, got {count}")
    return _PHRASINGS[count][phrasing].format(*[_object_phrase(o) for o in spec.objects])


def caption_for(scene: Scene, phrasing: int = 0) -> str:
    """Caption text of a scene with phrasing index in [0, NUM_PHRASINGS)."""
    return describe(CaptionSpec.from_scene(scene), phrasing)


class _Reader:
    """Recursive-descent reader over caption tokens; errors name the caption and the position."""

    def __init__(self, text: str):
        self.text = text
        self.words = caption_words(text)
        self.pos = 0

    def fail(self, expected: str) -> ValueError:
        found = self.words[self.pos] if self.pos < len(self.words) else "the end"
        return ValueError(f"cannot parse caption {self.text!r}: expected {expected} at '{found}' (word {self.pos + 1})")

    def take(self, sequence: tuple[str, ...]) -> bool:
        if tuple(self.words[self.pos : self.pos + len(sequence)]) == sequence:
            self.pos += len(sequence)
            return True
        return False

    def choice(self, options, what: str) -> str:
        word = self.words[self.pos] if self.pos < len(self.words) else None
        if word not in options:
            raise self.fail(f"{what} ({'/'.join(options)})")
        self.pos += 1
        return word

    def object(self) -> ObjectSpec:
        if not any(self.take(article) for article in _ARTICLES):
            raise self.fail("an article (a/one/a single)")
        size = self.choice(SIZES, "a size")
        color = self.choice(COLORS, "a colour")
        shape = self.choice(SHAPES, "a shape")
        return ObjectSpec(shape, color, size)

    def relation(self) -> str | None:
        self.take(("is",))
        for name, words in RELATION_WORDS.items():
            if self.take(tuple(words.split())):
                return name
        return None

    def at_end(self) -> bool:
        return self.pos == len(self.words)


def parse_caption(text: str) -> CaptionSpec:
    """Read a caption of the toy grammar back into a CaptionSpec; ValueError if it is not one."""
    reader = _Reader(text)
    declared_count = None
    for prefix, count in _PREFIXES.items():
        if reader.take(prefix):
            declared_count = count
            break
    objects = [reader.object()]
    relation = None
    if not reader.at_end():
        if reader.take((",",)):
            objects.append(reader.object())
            if not reader.take(("and",)):
                raise reader.fail("'and'")
            objects.append(reader.object())
        else:
            name = reader.relation()
            if name is None:
                raise reader.fail("a relation (to the left of/to the right of/above/below) or ','")
            objects.append(reader.object())
            relation = (0, name, 1)
    if not reader.at_end():
        raise reader.fail("the end of the caption")
    if declared_count is not None and declared_count != len(objects):
        raise ValueError(
            f"cannot parse caption {text!r}: it announces {declared_count} objects but lists {len(objects)}"
        )
    return CaptionSpec(tuple(objects), relation)


def _vocabulary() -> list[str]:
    words = set(SHAPES + COLORS + SIZES)
    for templates in _PHRASINGS.values():
        for template in templates:
            filled = template.format("x", "x", "x", rel="x", converse="x")
            words.update(w for w in caption_words(filled) if w != "x")
    for phrase in RELATION_WORDS.values():
        words.update(phrase.split())
    return sorted(words)


VOCABULARY: list[str] = _vocabulary()
