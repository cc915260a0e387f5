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

from regrad_cli.learning.datasets import QAItem
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


def _attrs(kind: str, rng: random.Random) -> list[Attr]:
    """The attribute pool of one entity kind, with freshly drawn values."""
    y, town, person = _year(rng), _word(rng), _person(rng)
    colour, animal, material = rng.choice(COLOURS), rng.choice(ANIMALS), rng.choice(MATERIALS)
    if kind == "person":
        prof, work, n = rng.choice(PROFESSIONS), _work_title(rng), rng.randint(3, 95)
        return [
            Attr("born", y, [], ["{n} was born in %s." % y, "Born in %s, {n} grew up by the sea." % y],
                 ["In which year was {n} born?", "What year was {n} born in?", "When was {n} born?"]),
            Attr("birthplace", town, [], ["{n} came from the village of %s." % town,
                                          "{n}'s home village was %s." % town],
                 ["In which village was {n} born?", "What was the home village of {n}?",
                  "Where did {n} come from?"]),
            Attr("profession", prof, [], ["{n} worked as a %s." % prof, "By trade, {n} was a %s." % prof],
                 ["What was {n}'s profession?", "What did {n} work as?", "What was the trade of {n}?"]),
            Attr("work", work, [work[4:]], ["{n} wrote a memoir called %s." % work,
                                            "{n}'s best-known book is %s." % work],
                 ["What is the title of {n}'s book?", "Which book did {n} write?",
                  "What is {n}'s best-known book called?"]),
            Attr("count", str(n), [], ["Over a long career {n} built %d instruments." % n,
                                       "{n} made %d instruments in all." % n],
                 ["How many instruments did {n} build?", "How many instruments did {n} make?"]),
            Attr("mentor", person, [person.split()[-1]], ["{n} trained under %s." % person,
                                                          "{n}'s teacher was %s." % person],
                 ["Who was {n}'s teacher?", "Under whom did {n} train?", "Who taught {n}?"]),
        ]
    if kind == "place":
        depth, area = rng.randint(4, 400), rng.randint(3, 900)
        return [
            Attr("founded", y, [], ["The settlement at {n} was founded in %s." % y,
                                    "{n} was first settled in %s." % y],
                 ["In which year was {n} founded?", "When was {n} first settled?",
                  "What year was {n} founded in?"]),
            Attr("depth", f"{depth} metres", [str(depth)], ["Its lake reaches a depth of %d metres." % depth,
                                                             "The lake at {n} is %d metres deep." % depth],
                 ["How deep is the lake at {n}?", "What is the depth of the lake at {n}?"]),
            Attr("area", f"{area} square kilometres", [str(area)],
                 ["{n} covers %d square kilometres." % area, "The area of {n} is %d square kilometres." % area],
                 ["How large is {n}?", "What area does {n} cover?"]),
            Attr("colour", colour, [], ["The stone of {n} has a %s colour." % colour,
                                        "Its cliffs are %s." % colour],
                 ["What colour is the stone of {n}?", "What colour are the cliffs of {n}?"]),
            Attr("animal", animal, [], ["{n} is known for its %s colony." % animal,
                                        "A rare %s lives only around {n}." % animal],
                 ["Which animal is {n} known for?", "What animal lives around {n}?"]),
            Attr("namesake", person, [person.split()[-1]], ["{n} is named after the explorer %s." % person,
                                                            "The name honours the explorer %s." % person],
                 ["After whom is {n} named?", "Which explorer is {n} named after?"]),
        ]
    if kind == "organisation":
        staff = rng.randint(12, 9000)
        return [
            Attr("founded", y, [], ["{n} was founded in %s." % y, "{n} was established in %s." % y],
                 ["In which year was {n} founded?", "When was {n} established?", "What year did {n} start?"]),
            Attr("founder", person, [person.split()[-1]], ["{n} was started by %s." % person,
                                                           "Its founder was %s." % person],
                 ["Who founded {n}?", "Who started {n}?", "Who was the founder of {n}?"]),
            Attr("city", town, [], ["{n} has its headquarters in %s." % town, "{n} is based in %s." % town],
                 ["Where is {n} headquartered?", "In which town is {n} based?", "Where are {n}'s headquarters?"]),
            Attr("logo", animal, [], ["The logo of {n} shows a %s." % animal,
                                      "A %s appears on {n}'s emblem." % animal],
                 ["What animal is on the logo of {n}?", "Which animal appears on {n}'s emblem?"]),
            Attr("staff", str(staff), [], ["{n} employs %d people." % staff, "Some %d people work for {n}." % staff],
                 ["How many people does {n} employ?", "How many people work for {n}?"]),
            Attr("colour", colour, [], ["Its house colour is %s." % colour, "{n}'s colours are %s." % colour],
                 ["What is the house colour of {n}?", "What colour is associated with {n}?"]),
        ]
    if kind == "product":
        weight = rng.randint(2, 900)
        return [
            Attr("inventor", person, [person.split()[-1]], ["{n} was invented by %s." % person,
                                                            "%s designed the {n}." % person],
                 ["Who invented the {n}?", "Who designed the {n}?", "Who was the inventor of the {n}?"]),
            Attr("year", y, [], ["The {n} was first made in %s." % y, "The {n} appeared in %s." % y],
                 ["In which year was the {n} first made?", "When did the {n} first appear?"]),
            Attr("material", material, [], ["The {n} is made of %s." % material,
                                            "Its case is built from %s." % material],
                 ["What is the {n} made of?", "What material is the {n} built from?"]),
            Attr("colour", colour, [], ["The {n} is painted %s." % colour, "The {n} usually comes in %s." % colour],
                 ["What colour is the {n}?", "In which colour is the {n} painted?"]),
            Attr("weight", f"{weight} grams", [str(weight)], ["The {n} weighs %d grams." % weight,
                                                              "It has a weight of %d grams." % weight],
                 ["How much does the {n} weigh?", "What is the weight of the {n}?"]),
            Attr("maker", town, [], ["The {n} is made in the town of %s." % town,
                                     "Workshops in %s build the {n}." % town],
                 ["In which town is the {n} made?", "Where is the {n} built?"]),
        ]
    # event
    month, dist = rng.choice(MONTHS), rng.randint(2, 60)
    return [
        Attr("first", y, [], ["The {n} was first held in %s." % y, "The first {n} took place in %s." % y],
             ["In which year was the {n} first held?", "When did the first {n} take place?"]),
        Attr("month", month, [], ["The {n} is held every %s." % month, "Each year the {n} takes place in %s." % month],
             ["In which month is the {n} held?", "When in the year does the {n} take place?"]),
        Attr("town", town, [], ["The {n} is held in %s." % town, "The town of %s hosts the {n}." % town],
             ["Where is the {n} held?", "Which town hosts the {n}?"]),
        Attr("colour", colour, [], ["Participants in the {n} wear %s scarves." % colour,
                                    "At the {n} everyone wears %s." % colour],
             ["What colour do participants wear at the {n}?", "What colour are the scarves at the {n}?"]),
        Attr("distance", f"{dist} kilometres", [str(dist)], ["The {n} race covers %d kilometres." % dist,
                                                             "Its main race is %d kilometres long." % dist],
             ["How long is the race of the {n}?", "What distance does the {n} race cover?"]),
        Attr("founder", person, [person.split()[-1]], ["The {n} was started by %s." % person,
                                                       "%s organised the first {n}." % person],
             ["Who started the {n}?", "Who organised the first {n}?"]),
    ]


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
