"""Write the built-in sample datasets in studio/assets/datasets/ (deterministic: same bytes every run).

    python scripts/make_datasets.py

instructions.jsonl  alpaca-format instructions with short, regular answers, so that a tiny
                    random-init model visibly learns them within 100 LoRA steps.
sentiment.jsonl     review sentences labelled positive / negative, for sequence classification.
Everything is written from the word lists below: no download, no external corpus.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "studio" / "assets" / "datasets"

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
           "fifteen sixteen seventeen eighteen nineteen twenty").split()
WORDS = """apple table river green house mouse light stone bread chair water cloud plant
sugar paper candy flower garden window pencil rabbit tiger horse sheep eagle snake lemon
grape melon peach cherry honey butter cheese pizza salad soup bottle glass spoon knife fork
plate clock watch phone radio piano guitar drum violin ball kite doll robot train plane
truck boat ship bike car road bridge tower castle forest desert island ocean lake hill
valley field farm city town school music story dream smile laugh happy quick brown lazy
small large warm cold bright dark soft hard sweet sour loud quiet early late north south
east west summer winter spring autumn morning evening night moon star planet rocket
""".split()
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Russia": "Moscow", "India": "New Delhi",
    "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin", "Portugal": "Lisbon",
    "Cuba": "Havana", "Iran": "Tehran", "Iraq": "Baghdad", "Turkey": "Ankara", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Argentina": "Buenos Aires", "Brazil": "Brasilia", "Australia": "Canberra",
    "Denmark": "Copenhagen", "Hungary": "Budapest", "Belgium": "Brussels", "Ghana": "Accra",
    "Nigeria": "Abuja", "Colombia": "Bogota", "Nepal": "Kathmandu", "Iceland": "Reykjavik",
    "Morocco": "Rabat",
}
PLURALS = {
    "cat": "cats", "dog": "dogs", "box": "boxes", "bus": "buses", "child": "children",
    "mouse": "mice", "man": "men", "woman": "women", "foot": "feet", "tooth": "teeth",
    "goose": "geese", "sheep": "sheep", "fish": "fish", "leaf": "leaves", "knife": "knives",
    "wolf": "wolves", "city": "cities", "baby": "babies", "party": "parties", "story": "stories",
    "key": "keys", "toy": "toys", "day": "days", "boy": "boys", "potato": "potatoes",
    "tomato": "tomatoes", "hero": "heroes", "photo": "photos", "piano": "pianos", "church": "churches",
    "watch": "watches", "dish": "dishes", "brush": "brushes", "glass": "glasses", "class": "classes",
    "person": "people", "ox": "oxen", "cactus": "cacti", "house": "houses", "tree": "trees",
    "book": "books", "car": "cars", "bird": "birds", "star": "stars", "apple": "apples",
    "lady": "ladies", "fox": "foxes", "bench": "benches", "wife": "wives", "life": "lives",
}
ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "happy": "sad", "light": "dark",
    "old": "young", "early": "late", "open": "closed", "full": "empty", "hard": "soft",
    "high": "low", "long": "short", "rich": "poor", "strong": "weak", "wet": "dry", "loud": "quiet",
    "thick": "thin", "heavy": "light", "clean": "dirty", "good": "bad", "new": "old", "first": "last",
    "in": "out", "left": "right", "near": "far", "day": "night", "win": "lose", "push": "pull",
    "buy": "sell", "give": "take", "black": "white", "true": "false", "yes": "no", "top": "bottom",
    "inside": "outside", "begin": "end", "start": "finish", "sweet": "sour", "cheap": "expensive",
    "safe": "dangerous", "easy": "hard", "wide": "narrow", "deep": "shallow", "north": "south",
    "east": "west", "love": "hate", "friend": "enemy", "summer": "winter", "always": "never",
}
COLORS = {
    "a banana": "yellow", "a lemon": "yellow", "the sun": "yellow", "a tomato": "red",
    "a strawberry": "red", "blood": "red", "a cherry": "red", "grass": "green", "a leaf": "green",
    "a frog": "green", "a lime": "green", "the sky": "blue", "the sea": "blue", "a blueberry": "blue",
    "snow": "white", "milk": "white", "a cloud": "white", "salt": "white", "coal": "black",
    "the night": "black", "a crow": "black", "an orange": "orange", "a carrot": "orange",
    "a pumpkin": "orange", "chocolate": "brown", "coffee": "brown", "a bear": "brown",
    "wood": "brown", "a plum": "purple", "an eggplant": "purple", "a flamingo": "pink",
    "a pig": "pink", "an elephant": "gray", "a mouse": "gray", "ash": "gray",
}
SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
    "horse": "neigh", "lion": "roar", "owl": "hoot", "frog": "ribbit", "bee": "buzz", "snake": "hiss",
    "mouse": "squeak", "rooster": "cock-a-doodle-doo", "goat": "maa", "donkey": "hee-haw",
    "crow": "caw", "wolf": "howl", "bird": "tweet", "chick": "cheep",
}


def instruction_rows(rng: random.Random) -> list[dict]:
    rows = []
    add = lambda instruction, output, input="": rows.append(
        {"instruction": instruction, "input": input, "output": output})
    for w in WORDS:
        add("Spell the word backwards, letter by letter.", " ".join(reversed(w)), w)
        add("Write the word in capital letters.", w.upper(), w)
        add(f"What is the first letter of the word {w}?", f"The first letter of {w} is {w[0]}.")
        add(f"How many letters are in the word {w}?", f"The word {w} has {NUMBERS[len(w)]} letters.")
    for country, city in CAPITALS.items():
        add(f"What is the capital of {country}?", f"The capital of {country} is {city}.")
    for word, plural in PLURALS.items():
        add(f"What is the plural of {word}?", f"The plural of {word} is {plural}.")
    for word, opposite in ANTONYMS.items():
        add(f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}.")
        add(f"What is the opposite of {opposite}?", f"The opposite of {opposite} is {word}.")
    for thing, color in COLORS.items():
        add(f"What color is {thing}?", f"{thing[0].upper()}{thing[1:]} is {color}.")
    for animal, sound in SOUNDS.items():
        add(f"What sound does a {animal} make?", f"A {animal} says {sound}.")
    for a in range(11):
        for b in range(11):
            add(f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
            if a >= b:
                add(f"What is {NUMBERS[a]} minus {NUMBERS[b]}?", f"{NUMBERS[a]} minus {NUMBERS[b]} is {NUMBERS[a - b]}.")
    for n in range(1, 100):
        add(f"What number comes after {n}?", f"After {n} comes {n + 1}.")
    for start in range(1, 40):
        for span in (3, 5):
            add(f"Count from {start} to {start + span}.", ", ".join(str(i) for i in range(start, start + span + 1)) + ".")
    rng.shuffle(rows)
    return rows


POS_ADJ = ("wonderful brilliant delightful superb charming excellent gorgeous moving fantastic "
           "beautiful thrilling hilarious heartfelt stunning flawless clever polished sturdy reliable "
           "comfortable outstanding impressive lovely smooth generous").split()
NEG_ADJ = ("terrible awful dull boring clumsy disappointing flimsy bland tedious sloppy mediocre "
           "painful annoying cheap broken confusing lifeless noisy pointless weak frustrating useless "
           "ugly shoddy forgettable").split()
MOVIE_ASPECTS = ("acting plot soundtrack ending dialogue pacing cast script cinematography "
                 "story direction humor").split()
PRODUCT_ASPECTS = ["battery", "screen", "build quality", "sound", "design", "price", "packaging",
                   "customer service", "setup", "handle", "motor"]
PRODUCTS = "phone blender laptop kettle headset vacuum camera backpack lamp speaker toaster watch".split()
POS_TEMPLATES = [
    "The {aspect} was {adj}.",
    "What a {adj} movie; the {aspect} alone is worth the ticket.",
    "I loved this film, the {aspect} was {adj} from start to finish.",
    "This {product} is {adj} and I would buy it again.",
    "Five stars: the {aspect} of this {product} is {adj}.",
    "Honestly {adj}, the best {product} I have owned.",
    "The {aspect} is {adj} and it works perfectly.",
    "A {adj} film with a {adj2} {aspect}; highly recommended.",
    "I am so happy with this {product}, everything about it is {adj}.",
    "My whole family enjoyed it, the {aspect} was {adj}.",
    "Great value, the {product} feels {adj} and well made.",
    "Not bad at all, in fact the {aspect} was {adj}.",
]
NEG_TEMPLATES = [
    "The {aspect} was {adj}.",
    "What a {adj} movie; the {aspect} ruined it for me.",
    "I hated this film, the {aspect} was {adj} from start to finish.",
    "This {product} is {adj} and I want my money back.",
    "One star: the {aspect} of this {product} is {adj}.",
    "Honestly {adj}, the worst {product} I have owned.",
    "The {aspect} is {adj} and it stopped working after a week.",
    "A {adj} film with a {adj2} {aspect}; avoid it.",
    "I regret buying this {product}, everything about it is {adj}.",
    "I walked out halfway, the {aspect} was {adj}.",
    "Waste of money, the {product} feels {adj} and badly made.",
    "Not good at all, the {aspect} was {adj}.",
]


def sentiment_rows(rng: random.Random, per_label: int = 300) -> list[dict]:
    rows, seen = [], set()
    for label, adjs, templates in (("positive", POS_ADJ, POS_TEMPLATES), ("negative", NEG_ADJ, NEG_TEMPLATES)):
        n = 0
        while n < per_label:
            t = rng.choice(templates)
            aspects = (MOVIE_ASPECTS if ("film" in t or "movie" in t) else PRODUCT_ASPECTS if "{product}" in t
                       else MOVIE_ASPECTS + PRODUCT_ASPECTS)
            adj, adj2 = rng.sample(adjs, 2)
            text = t.format(aspect=rng.choice(aspects), adj=adj, adj2=adj2, product=rng.choice(PRODUCTS))
            text = re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", text)  # "a annoying" -> "an annoying"
            text = text[0].upper() + text[1:]
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": label})
                n += 1
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} rows, {path.stat().st_size / 1024:.0f} KB")


def main() -> None:
    write_jsonl(OUT / "instructions.jsonl", instruction_rows(random.Random(0)))
    write_jsonl(OUT / "sentiment.jsonl", sentiment_rows(random.Random(1)))


if __name__ == "__main__":
    main()
