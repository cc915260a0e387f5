"""Unlimited invented knowledge: ``synthetic:SEED[:N]`` generates N entities and their questions.

Every entity (a person, place, organisation, product or event) gets an invented name, several
attributes with invented values, and one short encyclopaedia-style document that states them in
varied sentence templates and a random order. Each attribute gives one question, worded by one of
several paraphrases that do not copy the document's sentence. Some entities are *confusable
neighbours* of another: the same kind, a name sharing a part (``Lake Dorvane`` / ``Lake Dorvale``)
and the same attribute types with other values, so retrieval and injection must discriminate.

Everything is a pure function of (seed, N): ``random.Random(seed)`` drives every choice, so train
and dev sets made from different seeds are disjoint in documents and questions (names could
collide by chance; ``dev_overlap`` in tests checks how rarely). The base model cannot know any of
these facts, so a question can only be answered from the document's gradient or its text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from regrad_cli.learning.qa import QAItem
from regrad_cli.errors import DatasetError

MAX_ENTITIES = 1_000_000
DEFAULT_ENTITIES = 200

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr", "r", "s",
           "sk", "st", "t", "th", "tr", "v", "w", "z", "ch", "sh", "qu", "j"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ai", "ea", "ei", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "nd", "rn", "ck", "m", "sk", "lt", "x"]
_ENDINGS = ["ane", "ale", "ora", "ith", "wyn", "ford", "mere", "holm", "ton", "ard", "ell", "ova", "ick",
            "ara", "enne", "us", "ix", "orn", "ley", "wick"]

COLOURS = ["crimson", "amber", "violet", "teal", "ochre", "silver", "scarlet", "indigo", "olive", "ivory",
           "copper", "turquoise", "charcoal", "rose", "saffron", "emerald", "cobalt", "maroon"]
ANIMALS = ["heron", "otter", "lynx", "raven", "badger", "stag", "falcon", "hare", "wolf", "salmon", "owl",
           "fox", "beetle", "moth", "boar", "swan", "tortoise", "marten"]
PROFESSIONS = ["astronomer", "architect", "botanist", "cartographer", "chemist", "composer", "engineer",
               "geologist", "inventor", "linguist", "painter", "physician", "poet", "sculptor", "surveyor",
               "watchmaker", "glassblower", "mathematician"]
MATERIALS = ["bronze", "oak", "granite", "glass", "copper", "walnut", "porcelain", "slate", "brass", "cedar",
             "limestone", "iron", "silk", "marble"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WORK_WORDS = ["Orchard", "Lantern", "Harbour", "Winter", "Bridge", "Compass", "Meadow", "Tide", "Furnace",
              "Garden", "Mirror", "Ladder", "Falcon", "River", "Candle", "Anchor"]
WORK_ADJ = ["Silent", "Patient", "Hollow", "Northern", "Last", "Crooked", "Quiet", "Golden", "Broken",
            "Distant", "Little", "Long"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, stem: str | None = None) -> str:
    stem = stem or (_syllable(rng) + (_syllable(rng) if rng.random() < 0.2 else ""))
    return (stem + rng.choice(_ENDINGS)).capitalize()


def _person(rng: random.Random) -> str:
    return f"{_word(rng)} {_word(rng)}"


def _work_title(rng: random.Random) -> str:
    return f"The {rng.choice(WORK_ADJ)} {rng.choice(WORK_WORDS)}"


@dataclass
class Attr:
    key: str
    value: str
    aliases: list[str]
    sentences: list[str]  # ways the document states it ({n} = the entity's name)
    questions: list[str]  # ways a question asks for it ({n} = the entity's name)


def _year(rng, lo=1420, hi=1995) -> str:
    return str(rng.randint(lo, hi))


# What an entity of each kind has, as data. Every value is drawn per entity (``_attrs``): the ones
# every kind shares (year, town, person, colour, animal, material), then the kind's own ``DRAWS``
# in order; ``person_last`` and ``work_tail`` are derived. Each attribute is (key, value, aliases,
# sentences the document may state it with, questions that may ask for it); ``{field}`` is a drawn
# value, ``{n}`` the entity's name (filled in later).
DRAWS: dict[str, tuple] = {
    "person": (("profession", lambda rng: rng.choice(PROFESSIONS)), ("work", _work_title),
               ("count", lambda rng: rng.randint(3, 95))),
    "place": (("depth", lambda rng: rng.randint(4, 400)), ("area", lambda rng: rng.randint(3, 900))),
    "organisation": (("staff", lambda rng: rng.randint(12, 9000)),),
    "product": (("weight", lambda rng: rng.randint(2, 900)),),
    "event": (("month", lambda rng: rng.choice(MONTHS)), ("distance", lambda rng: rng.randint(2, 60))),
}
ATTRIBUTES: dict[str, list[tuple[str, str, list[str], list[str], list[str]]]] = {
    "person": [
        ("born", "{year}", [], ["{n} was born in {year}.", "Born in {year}, {n} grew up by the sea."],
         ["In which year was {n} born?", "What year was {n} born in?", "When was {n} born?"]),
        ("birthplace", "{town}", [], ["{n} came from the village of {town}.", "{n}'s home village was {town}."],
         ["In which village was {n} born?", "What was the home village of {n}?", "Where did {n} come from?"]),
        ("profession", "{profession}", [], ["{n} worked as a {profession}.", "By trade, {n} was a {profession}."],
         ["What was {n}'s profession?", "What did {n} work as?", "What was the trade of {n}?"]),
        ("work", "{work}", ["{work_tail}"], ["{n} wrote a memoir called {work}.", "{n}'s best-known book is {work}."],
         ["What is the title of {n}'s book?", "Which book did {n} write?", "What is {n}'s best-known book called?"]),
        ("count", "{count}", [], ["Over a long career {n} built {count} instruments.",
                                  "{n} made {count} instruments in all."],
         ["How many instruments did {n} build?", "How many instruments did {n} make?"]),
        ("mentor", "{person}", ["{person_last}"], ["{n} trained under {person}.", "{n}'s teacher was {person}."],
         ["Who was {n}'s teacher?", "Under whom did {n} train?", "Who taught {n}?"]),
    ],
    "place": [
        ("founded", "{year}", [], ["The settlement at {n} was founded in {year}.", "{n} was first settled in {year}."],
         ["In which year was {n} founded?", "When was {n} first settled?", "What year was {n} founded in?"]),
        ("depth", "{depth} metres", ["{depth}"], ["Its lake reaches a depth of {depth} metres.",
                                                  "The lake at {n} is {depth} metres deep."],
         ["How deep is the lake at {n}?", "What is the depth of the lake at {n}?"]),
        ("area", "{area} square kilometres", ["{area}"], ["{n} covers {area} square kilometres.",
                                                          "The area of {n} is {area} square kilometres."],
         ["How large is {n}?", "What area does {n} cover?"]),
        ("colour", "{colour}", [], ["The stone of {n} has a {colour} colour.", "Its cliffs are {colour}."],
         ["What colour is the stone of {n}?", "What colour are the cliffs of {n}?"]),
        ("animal", "{animal}", [], ["{n} is known for its {animal} colony.", "A rare {animal} lives only around {n}."],
         ["Which animal is {n} known for?", "What animal lives around {n}?"]),
        ("namesake", "{person}", ["{person_last}"], ["{n} is named after the explorer {person}.",
                                                     "The name honours the explorer {person}."],
         ["After whom is {n} named?", "Which explorer is {n} named after?"]),
    ],
    "organisation": [
        ("founded", "{year}", [], ["{n} was founded in {year}.", "{n} was established in {year}."],
         ["In which year was {n} founded?", "When was {n} established?", "What year did {n} start?"]),
        ("founder", "{person}", ["{person_last}"], ["{n} was started by {person}.", "Its founder was {person}."],
         ["Who founded {n}?", "Who started {n}?", "Who was the founder of {n}?"]),
        ("city", "{town}", [], ["{n} has its headquarters in {town}.", "{n} is based in {town}."],
         ["Where is {n} headquartered?", "In which town is {n} based?", "Where are {n}'s headquarters?"]),
        ("logo", "{animal}", [], ["The logo of {n} shows a {animal}.", "A {animal} appears on {n}'s emblem."],
         ["What animal is on the logo of {n}?", "Which animal appears on {n}'s emblem?"]),
        ("staff", "{staff}", [], ["{n} employs {staff} people.", "Some {staff} people work for {n}."],
         ["How many people does {n} employ?", "How many people work for {n}?"]),
        ("colour", "{colour}", [], ["Its house colour is {colour}.", "{n}'s colours are {colour}."],
         ["What is the house colour of {n}?", "What colour is associated with {n}?"]),
    ],
    "product": [
        ("inventor", "{person}", ["{person_last}"], ["{n} was invented by {person}.", "{person} designed the {n}."],
         ["Who invented the {n}?", "Who designed the {n}?", "Who was the inventor of the {n}?"]),
        ("year", "{year}", [], ["The {n} was first made in {year}.", "The {n} appeared in {year}."],
         ["In which year was the {n} first made?", "When did the {n} first appear?"]),
        ("material", "{material}", [], ["The {n} is made of {material}.", "Its case is built from {material}."],
         ["What is the {n} made of?", "What material is the {n} built from?"]),
        ("colour", "{colour}", [], ["The {n} is painted {colour}.", "The {n} usually comes in {colour}."],
         ["What colour is the {n}?", "In which colour is the {n} painted?"]),
        ("weight", "{weight} grams", ["{weight}"], ["The {n} weighs {weight} grams.",
                                                    "It has a weight of {weight} grams."],
         ["How much does the {n} weigh?", "What is the weight of the {n}?"]),
        ("maker", "{town}", [], ["The {n} is made in the town of {town}.", "Workshops in {town} build the {n}."],
         ["In which town is the {n} made?", "Where is the {n} built?"]),
    ],
    "event": [
        ("first", "{year}", [], ["The {n} was first held in {year}.", "The first {n} took place in {year}."],
         ["In which year was the {n} first held?", "When did the first {n} take place?"]),
        ("month", "{month}", [], ["The {n} is held every {month}.", "Each year the {n} takes place in {month}."],
         ["In which month is the {n} held?", "When in the year does the {n} take place?"]),
        ("town", "{town}", [], ["The {n} is held in {town}.", "The town of {town} hosts the {n}."],
         ["Where is the {n} held?", "Which town hosts the {n}?"]),
        ("colour", "{colour}", [], ["Participants in the {n} wear {colour} scarves.",
                                    "At the {n} everyone wears {colour}."],
         ["What colour do participants wear at the {n}?", "What colour are the scarves at the {n}?"]),
        ("distance", "{distance} kilometres", ["{distance}"], ["The {n} race covers {distance} kilometres.",
                                                               "Its main race is {distance} kilometres long."],
         ["How long is the race of the {n}?", "What distance does the {n} race cover?"]),
        ("founder", "{person}", ["{person_last}"], ["The {n} was started by {person}.",
                                                    "{person} organised the first {n}."],
         ["Who started the {n}?", "Who organised the first {n}?"]),
    ],
}


def _attrs(kind: str, rng: random.Random) -> list[Attr]:
    """The attribute pool of one entity kind (``ATTRIBUTES``), with freshly drawn values."""
    values = {"year": _year(rng), "town": _word(rng), "person": _person(rng), "colour": rng.choice(COLOURS),
              "animal": rng.choice(ANIMALS), "material": rng.choice(MATERIALS)}
    for field, draw in DRAWS[kind]:
        values[field] = draw(rng)
    values["person_last"] = values["person"].split()[-1]
    values["work_tail"] = values.get("work", "")[4:]  # the title without "The "

    def fill(text: str) -> str:
        return text.format(n="{n}", **values)  # {n} stays for the entity's name

    return [Attr(key, fill(value), [fill(a) for a in aliases], [fill(s) for s in sentences], list(questions))
            for key, value, aliases, sentences, questions in ATTRIBUTES[kind]]


KINDS = ("person", "place", "organisation", "product", "event")
_PLACE_WORDS = ["Lake", "Mount", "Isle of", "Vale of", "Port"]
_ORG_WORDS = ["Company", "Society", "Guild", "Works", "Institute"]
_PRODUCT_WORDS = ["Engine", "Lamp", "Loom", "Clock", "Compass", "Telescope"]
_EVENT_WORDS = ["Festival", "Fair", "Regatta", "Games", "Procession"]


def _name(kind: str, rng: random.Random, stem: str | None, frame: str | None) -> tuple[str, str]:
    """(name, its frame word) for an entity; a neighbour reuses the stem and frame."""
    if kind == "person":
        first = _word(rng)
        last = _word(rng, stem)
        return f"{first} {last}", ""
    word = _word(rng, stem)
    if kind == "place":
        frame = frame or rng.choice(_PLACE_WORDS)
        return f"{frame} {word}", frame
    if kind == "organisation":
        frame = frame or rng.choice(_ORG_WORDS)
        return f"{word} {frame}", frame
    if kind == "product":
        frame = frame or rng.choice(_PRODUCT_WORDS)
        return f"{word} {frame}", frame
    frame = frame or rng.choice(_EVENT_WORDS)
    return f"{word} {frame}", frame


def generate(seed: int, n_entities: int = DEFAULT_ENTITIES, *, neighbour_rate: float = 0.3,
             attrs_per_entity: tuple[int, int] = (4, 6)) -> list[QAItem]:
    """Questions (QAItems, one per stated attribute) over n_entities invented entities."""
    if not 1 <= n_entities <= MAX_ENTITIES:
        raise DatasetError(f"synthetic: N must be between 1 and {MAX_ENTITIES}, got {n_entities}")
    rng = random.Random(f"regrad-synthetic-{seed}")
    items: list[QAItem] = []
    prev: tuple[str, str, str] | None = None  # kind, stem, frame of the last entity
    for e in range(n_entities):
        if prev is not None and rng.random() < neighbour_rate:
            kind, stem, frame = prev  # a confusable neighbour of the previous entity
        else:
            kind, stem, frame = rng.choice(KINDS), _syllable(rng), None
        name, frame = _name(kind, rng, stem, frame)
        prev = (kind, stem, frame)
        pool = _attrs(kind, rng)
        chosen = rng.sample(pool, rng.randint(*attrs_per_entity))
        sentences = [rng.choice(a.sentences).format(n=name) for a in chosen]
        rng.shuffle(sentences)
        doc = f"# {name}\n\n" + " ".join(s[0].upper() + s[1:] for s in sentences) + "\n"
        for a in chosen:
            q = rng.choice(a.questions).format(n=name)
            items.append(QAItem(f"syn{seed}-{e}-{a.key}", q, [a.value, *a.aliases], [doc], "qa",
                                {"entity": name, "kind": kind, "attribute": a.key}))
    return items


def parse(rest: str) -> tuple[int, int]:
    """'SEED[:N]' -> (seed, N)."""
    seed_s, _, n_s = rest.partition(":")
    try:
        seed = int(seed_s)
        n = int(n_s) if n_s else DEFAULT_ENTITIES
    except ValueError:
        raise DatasetError(f"synthetic dataset must be synthetic:SEED[:N] with integers, got {rest!r}") from None
    if seed < 0 or not 1 <= n <= MAX_ENTITIES:
        raise DatasetError(f"synthetic:SEED[:N] needs SEED >= 0 and 1 <= N <= {MAX_ENTITIES}, got {rest!r}")
    return seed, n
