"""Build questions.jsonl for the invented regrad demo corpus.

Run from anywhere:  python regrad_cli/data/demo/make_questions.py

Each output line is a JSON object
    {"id", "question", "answers", "documents", "source"}
where "documents" holds the full text of the supporting corpus file,
byte-identical to the .md file.  The script checks that every answer
(and alias) occurs case-insensitively in its document, that ids are
unique, and that every document is 60-140 words long.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
OUT = HERE / "questions.jsonl"
MIN_WORDS, MAX_WORDS = 60, 140

# file name -> [(question, [answer, alias, ...]), ...]
QUESTIONS: dict[str, list[tuple[str, list[str]]]] = {
    "01-velmora-ridge-observatory.md": [
        ("In which year was the Velmora Ridge Observatory founded?", ["1887"]),
        ("Which astronomer founded the Velmora Ridge Observatory?", ["Corwen Aldish", "Aldish"]),
        ("Every how many years does the comet Aldish–Porro return?", ["43 years", "43"]),
    ],
    "02-lake-quillmere.md": [
        ("What is the maximum depth of Lake Quillmere?", ["212 metres", "212"]),
        ("Which fishing town is the only settlement on the shore of Lake Quillmere?", ["Edderholm"]),
        ("What colour is the water of Lake Quillmere?", ["turquoise"]),
    ],
    "03-lake-quillmoor.md": [
        ("What is the greatest depth of Lake Quillmoor?", ["9 metres"]),
        ("What colour is the water of Lake Quillmoor?", ["dark amber", "amber"]),
        ("Which cartographer first mapped Lake Quillmoor?", ["Hendrin Molk", "Molk"]),
    ],
    "04-tashkel-pryde.md": [
        ("In which village was the inventor Tashkel Pryde born?", ["Dunmarrow"]),
        ("How many patents did Tashkel Pryde hold?", ["37"]),
        ("What is the title of Tashkel Pryde's memoir?", ["Iron and Patience"]),
    ],
    "05-brindlecort-fc.md": [
        ("In which year was Brindlecort FC founded?", ["1903"]),
        ("What is the name of Brindlecort FC's home ground?", ["Tanner's Field"]),
        ("What is the nickname of Brindlecort FC?", ["the Herons", "Herons"]),
    ],
    "06-zorvanite.md": [
        ("Which chemist first prepared zorvanite?", ["Ilse Marranow", "Marranow"]),
        ("What colour are zorvanite crystals at room temperature?", ["deep violet", "violet"]),
        ("Above what temperature do zorvanite crystals turn yellow?", ["340 °C", "340"]),
    ],
    "07-kettlewyn-river.md": [
        ("How long is the Kettlewyn River?", ["164 kilometres", "164"]),
        ("What does the name Kettlewyn mean in the old Hesk dialect?", ["copper stream"]),
        ("At which springs does the Kettlewyn River rise?", ["Blackthorn Springs", "the Blackthorn Springs"]),
    ],
    "08-glimmerscript.md": [
        ("Who designed the Glimmerscript programming language?", ["Annika Threll", "Threll"]),
        ("What file extension do Glimmerscript programs use?", [".glim", "glim"]),
        ("What is the name of Glimmerscript's firefly mascot?", ["Pim"]),
    ],
    "09-marrowfen-signal-company.md": [
        ("Who was Tashkel Pryde's business partner in founding the Marrowfen Signal Company?", ["Gideon Halloway", "Halloway"]),
        ("What is the name of the Marrowfen Signal Company's headquarters building?", ["the Lamp House", "Lamp House"]),
        ("What animal appears in the Marrowfen Signal Company's logo?", ["black fox", "fox"]),
    ],
    "10-isle-of-varrask.md": [
        ("What is the only town on the island of Varrask?", ["Harnsby"]),
        ("What is the highest point on Varrask called?", ["Gull Crown"]),
        ("What colour is the mane of the Varrask pony?", ["silver"]),
    ],
    "11-emberwake-festival.md": [
        ("Which event does the Emberwake Festival commemorate?", ["the Great Mill Fire", "Great Mill Fire"]),
        ("What is the straw figure burned at the Emberwake Festival called?", ["the Old Miller", "Old Miller"]),
        ("What colour are the scarves worn at the Emberwake Festival?", ["blue"]),
    ],
    "12-cindermoot-festival.md": [
        ("In which town is the Cindermoot Festival held?", ["Tervagh"]),
        ("How many barrels of burning tar are rolled down Steeple Lane at Cindermoot?", ["twelve"]),
        ("What colour are the cloaks worn by the barrel teams at Cindermoot?", ["green"]),
    ],
    "13-sallowcake.md": [
        ("From which town does sallowcake come?", ["Pennimore"]),
        ("Which baker is credited with the sallowcake recipe?", ["Marta Elvenrue", "Elvenrue"]),
        ("What prize does the Pennimore Guild of Bakers award for the best sallowcake?", ["a copper spoon", "copper spoon"]),
    ],
    "14-thrumhorn.md": [
        ("From what wood is a thrumhorn carved?", ["silver birch", "birch"]),
        ("How far can the sound of a thrumhorn carry on a still day?", ["9 kilometres"]),
        ("What album did thrumhorn player Orlin Vasquell record in 1958?", ["Valley Voices"]),
    ],
    "15-trellic-glassback-salamander.md": [
        ("What colour is the belly of the Trellic glassback salamander?", ["coral pink", "pink"]),
        ("How long can a Trellic glassback salamander live?", ["60 years", "60"]),
        ("Which zoologist first described the Trellic glassback salamander?", ["Perrin Oakhaven", "Oakhaven"]),
    ],
    "16-vesperine-moth.md": [
        ("What colour are the wings of the vesperine moth?", ["cobalt blue", "blue"]),
        ("Which naturalist first recorded the vesperine moth?", ["Agathe Wendmoor", "Wendmoor"]),
        ("Which village holds a Moth Night each June for the vesperine moth?", ["Osk"]),
    ],
    "17-treaty-of-calvenmoor.md": [
        ("Which war did the Treaty of Calvenmoor end?", ["the Nine Years' Salt War", "Nine Years' Salt War", "Salt War"]),
        ("In which year was the Treaty of Calvenmoor signed?", ["1722"]),
        ("Which queen of Brenacia signed the Treaty of Calvenmoor?", ["Queen Sidonie", "Sidonie"]),
    ],
    "18-skarnball.md": [
        ("Who invented the sport of skarnball?", ["Helvig Tarrow", "Tarrow"]),
        ("How many players are on each skarnball team?", ["seven"]),
        ("What material is a skarnball ball made of?", ["cork"]),
    ],
    "19-ulvenby.md": [
        ("On which river does the town of Ulvenby stand?", ["River Tesh", "the River Tesh", "Tesh"]),
        ("In which year was Ulvenby granted its town charter?", ["1386"]),
        ("What animal is shown on Ulvenby's coat of arms?", ["white wolf", "wolf"]),
    ],
    "20-pellworth-engine.md": [
        ("How much power did the Pellworth Engine produce?", ["6 horsepower"]),
        ("What colour was the boiler of the Pellworth Engine painted?", ["bottle green", "green"]),
        ("What is the nickname of the working Pellworth Engine in the Kessford Museum of Industry?", ["Old Bessamy"]),
    ],
    "21-the-copper-wrens.md": [
        ("Who was the singer of the Copper Wrens?", ["Lissa Harrowby", "Harrowby"]),
        ("What was the title of the Copper Wrens' debut album?", ["Lanterns on the Marsh"]),
        ("In which year were the Copper Wrens formed?", ["1971"]),
    ],
    "22-veskari-tapestry.md": [
        ("What is the finest surviving Veskari tapestry called?", ["the Harnsby Hanging", "Harnsby Hanging"]),
        ("How long is the Harnsby Hanging?", ["7 metres"]),
        ("Which weaver revived Veskari tapestry in the 1950s?", ["Runa Stelk", "Stelk"]),
    ],
    "23-tollvane-cheese.md": [
        ("From what kind of milk is Tollvane cheese made?", ["ewe's milk", "ewe"]),
        ("For at least how long is Tollvane cheese aged?", ["14 months", "14"]),
        ("What is Tollvane cheese traditionally served with?", ["quince jam", "quince"]),
    ],
    "24-mount-serrakai.md": [
        ("How high is Mount Serrakai?", ["4,112 metres", "4,112"]),
        ("Who made the first ascent of Mount Serrakai?", ["Ada Pemberlane", "Pemberlane"]),
        ("What is the summit snowfield of Mount Serrakai called?", ["the Anvil", "Anvil"]),
    ],
    "25-hallowick-effect.md": [
        ("Which physicist discovered the Hallowick effect?", ["Wendeline Hallowick"]),
        ("In which year was the Hallowick effect discovered?", ["1934"]),
        ("Which musical note is the hum of the Hallowick effect close to?", ["F sharp"]),
    ],
    "26-quenbright-aeronautics.md": [
        ("In which city was Quenbright Aeronautics founded?", ["Tolvik"]),
        ("What is Quenbright Aeronautics' best-selling aircraft model?", ["QA-11 Kestrel", "the QA-11 Kestrel", "Kestrel"]),
        ("What colour is the tail in Quenbright Aeronautics' signature livery?", ["yellow"]),
    ],
    "27-ysolde-kravenn.md": [
        ("What was the name of the brig Ysolde Kravenn commanded in 1764?", ["Marigold"]),
        ("How many voyages did Ysolde Kravenn make?", ["four"]),
        ("In what material are Ysolde Kravenn's logbooks bound?", ["blue sealskin", "sealskin"]),
    ],
    "28-corrowmere-college.md": [
        ("In which year was Corrowmere College founded?", ["1824"]),
        ("What bird appears in the emblem of Corrowmere College?", ["a swan", "swan"]),
        ("On which square does Corrowmere College stand?", ["Mintwell Square", "Mintwell"]),
    ],
    "29-wreck-of-the-veyla-star.md": [
        ("On which rocks was the Veyla Star wrecked?", ["the Hound's Teeth", "Hound's Teeth"]),
        ("How many of the Veyla Star's crew survived the wreck?", ["29"]),
        ("Which lighthouse keeper led the rescue of the Veyla Star's crew?", ["Bettany Croll", "Croll"]),
    ],
    "30-museum-of-drift-glass.md": [
        ("Who opened the Museum of Drift Glass?", ["Fenna Rostrup", "Rostrup"]),
        ("What is the most prized object in the Museum of Drift Glass?", ["the Amber Eye", "Amber Eye"]),
        ("On which day of the week is the Museum of Drift Glass closed?", ["Tuesday"]),
    ],
    "31-skelvin-programming-language.md": [
        ("Who created the Skelvin programming language?", ["Teodora Vask", "Vask"]),
        ("What file extension do Skelvin source files use?", [".skv", "skv"]),
        ("What is the name of Skelvin's package manager?", ["Nestbox"]),
    ],
    "32-sunvessel-lily.md": [
        ("What colour are the flowers of the sunvessel lily?", ["saffron yellow", "yellow"]),
        ("In which month does the sunvessel lily flower?", ["July"]),
        ("Which botanist named the sunvessel lily?", ["Elspet Varn", "Varn"]),
    ],
    "33-orrinford-bridge.md": [
        ("Which architect designed the Orrinford Bridge?", ["Silas Brennock", "Brennock"]),
        ("How many arches does the Orrinford Bridge have?", ["five"]),
        ("What stone was the Orrinford Bridge built from?", ["pink granite", "granite"]),
    ],
    "34-tavlek.md": [
        ("How many cells does a Tavlek board have?", ["61"]),
        ("Which Tavlek piece must be protected?", ["Keeper"]),
        ("Who is the reigning Tavlek world champion?", ["Mirko Hallendt", "Hallendt"]),
    ],
    "35-tirravel-reel.md": [
        ("How many couples dance the Tirravel reel?", ["eight"]),
        ("What colour are the sashes worn for the Tirravel reel?", ["red"]),
        ("Which collector first wrote down the Tirravel reel?", ["Ivo Sandrick", "Sandrick"]),
    ],
    "36-kessmar-wind.md": [
        ("What do local farmers call the Kessmar wind?", ["the snow-eater", "snow-eater"]),
        ("What top speed can the Kessmar wind reach?", ["110 kilometres per hour", "110"]),
        ("Which meteorologist first measured the Kessmar wind scientifically?", ["Aldo Fennech", "Fennech"]),
    ],
}


def main() -> int:
    files = sorted(CORPUS.glob("*.md"))
    names = [f.name for f in files]
    missing = sorted(set(names) ^ set(QUESTIONS))
    if missing:
        print(f"corpus files and QUESTIONS keys differ: {missing}", file=sys.stderr)
        return 1

    errors: list[str] = []
    rows: list[dict] = []
    print(f"{'words':>5}  file")
    for f in files:
        # newline="" keeps the text byte-identical to the file.
        with open(f, encoding="utf-8", newline="") as fh:
            text = fh.read()
        n_words = len(text.split())
        print(f"{n_words:>5}  {f.name}")
        if not text.startswith("# "):
            errors.append(f"{f.name}: does not start with '# Title'")
        if not MIN_WORDS <= n_words <= MAX_WORDS:
            errors.append(f"{f.name}: {n_words} words, outside {MIN_WORDS}-{MAX_WORDS}")
        lower = text.lower()
        for question, answers in QUESTIONS[f.name]:
            for a in answers:
                if a.lower() not in lower:
                    errors.append(f"{f.name}: answer {a!r} not in document ({question})")
            rows.append(
                {
                    "id": f"demo-{len(rows) + 1:03d}",
                    "question": question,
                    "answers": answers,
                    "documents": [text],
                    "source": f.name,
                }
            )

    ids = [r["id"] for r in rows]
    if len(ids) != len(set(ids)):
        errors.append("duplicate ids")
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1

    with open(OUT, "w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} questions for {len(files)} documents to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
