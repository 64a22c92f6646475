"""Write the built-in chat dataset `profile-json` (deterministic: same bytes every run).

    python scripts/make_profile_json.py

The skill: whatever sentence about a person the user sends, the assistant answers with one
line of strict JSON, always the same four keys in the same order,

    {"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse"}

(age an integer, job in lower case, nothing before or after). SmolLM2-135M-Instruct answers
such a sentence with prose ("Maria Lopez is a 34-year-old nurse..."), so one answer in the
Playground shows whether the adapter took, and exact match scores it without judgement calls.
Conversations have 1 to 3 user turns, each answered the same way, so later turns learn to keep
the format with earlier cards in the context.

profile-json.jsonl          training conversations: names, cities, jobs and sentence shapes
                            from the TRAIN lists below.
profile-json-heldout.jsonl  held-out conversations for `studio eval --data`: other first and
                            last names, other cities and jobs, and sentence shapes the training
                            file never uses (questions, third-person reports, lists of facts).
Everything comes from the word lists below: no download, no external corpus.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "studio" / "assets" / "datasets"
N_TRAIN, N_HELDOUT = 480, 40

FIRST = {
    "train": """Maria James Aisha Lucas Sofia Omar Elena Noah Priya Daniel Hana Mateo Chloe Ivan
             Fatima Leo Grace Yusuf Emma Kenji Amara Victor Nina Samuel Lena Diego Mei Arthur
             Zara Felix Ines Hugo Maya Oscar Rosa Theo Alice Karim Julia Tomas""".split(),
    "heldout": """Beatrix Caspian Delphine Ezra Freya Gideon Ingrid Jasper Lorelei Magnus Odessa
               Percival Quinn Rowena Silas Tamsin Ulric Vesna Wendell Xenia""".split(),
}
LAST = {
    "train": """Lopez Smith Khan Martin Rossi Haddad Petrova Brown Sharma Garcia Sato Silva Dubois
             Novak Ali Fischer Evans Demir Muller Tanaka Okafor Costa Berg Cohen Wagner Reyes
             Chen Wright Nasser Weber Ferreira Laurent Moreau Lindqvist Russo Keller""".split(),
    "heldout": """Abernathy Blackwood Castellano Drummond Everhart Fairweather Grimaldi Holloway
               Ironside Jorgensen Kowalczyk Langford Montague Northcott Oyelaran""".split(),
}
CITIES = {
    "train": """Lisbon Paris Berlin Madrid Rome Vienna Prague Dublin Oslo Warsaw Athens Cairo
             Nairobi Lagos Tokyo Seoul Lima Toronto Chicago Denver Sydney Mumbai Istanbul Munich
             Porto Milan Lyon Boston Austin Seattle""".split(),
    "heldout": """Reykjavik Tbilisi Montevideo Ljubljana Windhoek Hobart Tallinn Valparaiso Quebec
               Marrakesh Bergen Cork""".split(),
}
JOBS = {
    "train": """nurse teacher plumber architect baker pilot lawyer chef dentist farmer journalist
             electrician pharmacist librarian carpenter firefighter accountant painter mechanic
             photographer engineer tailor veterinarian gardener""".split(),
    "heldout": """cartographer glassblower beekeeper translator locksmith astronomer
               choreographer sommelier""".split(),
}
# {a}n: "a" or "an" before the job.
SHAPES = {
    "train": [
        "{name} is {age} and lives in {city}, where {p} works as {a} {job}.",
        "{name}, {age}, is {a} {job} from {city}.",
        "Meet {name}: {a} {job} in {city}, {age} years old.",
        "{name} works as {a} {job} in {city} and is {age} years old.",
        "I met {name} yesterday. {P} is {a} {job}, {age}, and lives in {city}.",
        "{name} ({age}) has been {a} {job} in {city} for years.",
        "My neighbour {name} is {age}. {P} moved to {city} to work as {a} {job}.",
        "{name} lives in {city}. {P} is {age} and is {a} {job}.",
    ],
    "heldout": [
        "Can you make a card for {name}? {P}'s {a} {job}, aged {age}, based in {city}.",
        "According to the report, {a} {job} named {name} ({age}) was seen in {city}.",
        "name {name} / age {age} / town {city} / occupation: {job}",
        "At {age}, {name} finally opened a studio in {city} as {a} {job}.",
        "Our new hire is {name}, {a} {job} who is {age} and commutes from {city}.",
    ],
}
FOLLOW_UPS = {
    "train": ["And this one: ", "Next: ", "Another one. ", "", "Now do this: "],
    "heldout": ["Here is one more. ", "Same again please: ", ""],
}


def card(name: str, age: int, city: str, job: str) -> str:
    """The one answer shape: keys in this order, age an integer, one line."""
    return json.dumps({"name": name, "age": age, "city": city, "job": job})


def person(rng: random.Random, split: str) -> tuple[str, str]:
    name = f"{rng.choice(FIRST[split])} {rng.choice(LAST[split])}"
    age, city, job = rng.randint(19, 78), rng.choice(CITIES[split]), rng.choice(JOBS[split])
    he = rng.choice(["He", "She", "They"])
    sentence = rng.choice(SHAPES[split]).format(
        name=name, age=age, city=city, job=job, a="an" if job[0] in "aeiou" else "a", P=he, p=he.lower())
    if he == "They":
        sentence = sentence.replace("They is", "They are").replace("They's", "They're").replace("they works", "they work")
    return sentence, card(name, age, city, job)


def conversation(rng: random.Random, split: str) -> dict:
    turns = rng.choice([1, 1, 2, 2, 3])
    msgs = []
    for t in range(turns):
        sentence, answer = person(rng, split)
        prefix = rng.choice(FOLLOW_UPS[split]) if t else ""
        msgs += [{"role": "user", "content": prefix + sentence}, {"role": "assistant", "content": answer}]
    return {"messages": msgs}


def write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    rng = random.Random(12)
    write(OUT / "profile-json.jsonl", [conversation(rng, "train") for _ in range(N_TRAIN)])
    rng = random.Random(34)
    write(OUT / "profile-json-heldout.jsonl", [conversation(rng, "heldout") for _ in range(N_HELDOUT)])


if __name__ == "__main__":
    main()
