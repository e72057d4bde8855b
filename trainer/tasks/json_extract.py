r"""The built-in `json-extract` task (its task file: builtin/json-extract.yaml): structured output.

Each prompt gives a one-sentence text about a person, a product or a book and asks for some of
its details as a JSON object with exactly the listed keys, numbers as JSON numbers, and nothing
but the object. The reward (`reward`, a `python:` checker) grades validity and content:

    0.0   no JSON object anywhere in the answer
    +0.2  a JSON object parses (bare, in a code fence, or inside prose)
    +0.2  the answer is the object and nothing else (no fence, no prose)
    +0.2  its keys are exactly the requested ones
    +0.4  x the share of requested keys holding the right value (strings compared case- and
          space-insensitively; numbers must be JSON numbers)

so 1.0 is a perfect answer. Prompts are generated deterministically from the lists below (nothing
is downloaded); held-out prompts use people, products and books that never appear in training,
and the checker knows the answer of every generated prompt.

    >>> train = prompts("train", 400)
    >>> len(train), len(prompts("eval", 100)), train[0]["messages"][0]["role"]
    (400, 100, 'user')
    >>> p = prompts("eval", 1)[0]["messages"][0]["content"]
    >>> print(p)
    Turn the following text into a JSON object with exactly the keys "name", "age", "job". Give "age" as a number. Do not write anything except the JSON object.
    <BLANKLINE>
    Text: Born and raised in Melbourne, Ada Sharma is 53 and works as a nurse.
    >>> expected_answer(p)
    {'name': 'Ada Sharma', 'age': 53, 'job': 'nurse'}
    >>> perfect, fenced = '{"name": "Ada Sharma", "age": 53, "job": "nurse"}', '```json\n{"name": "Ada", "age": "53", "job": "Nurse"}\n```'
    >>> reward([p] * 3, [perfect, fenced, "Ada Sharma, 53, nurse"])
    [1.0, 0.533333, 0.0]
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import Any, Literal

FIRST = ["Maria", "Tomas", "Aisha", "Jonas", "Priya", "Lucas", "Elena", "Omar", "Sofia", "Daniel", "Hana", "Victor",
         "Chloe", "Mateo", "Ingrid", "Kwame", "Lena", "Rafael", "Yuki", "Samuel",
         # held-out first names (the last 6)
         "Ada", "Felix", "Noor", "Bruno", "Greta", "Idris"]
LAST = ["Lopez", "Novak", "Haddad", "Berg", "Sharma", "Moreau", "Petrova", "Okafor", "Rossi", "Keller", "Tanaka",
        "Silva", "Byrne", "Larsen", "Adeyemi", "Costa"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Toronto", "Lyon", "Osaka", "Denver", "Krakow", "Porto", "Melbourne",
          "Valencia", "Cairo", "Dublin", "Seoul"]
JOBS = ["nurse", "pilot", "teacher", "chef", "architect", "plumber", "lawyer", "photographer", "baker", "engineer"]
PRODUCTS = ["backpack", "kettle", "desk lamp", "rain jacket", "blender", "office chair", "water bottle", "headphones",
            "toaster", "yoga mat", "umbrella", "wall clock",
            # held-out products (the last 4)
            "coffee grinder", "sleeping bag", "bike helmet", "travel mug"]
BRANDS = ["Northwind", "Acme", "Brightline", "Larkspur", "Solace", "Ferro", "Kestrel", "Tidemark"]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange"]
TITLES = ["The Salt Orchard", "Winter Engines", "A Map of Small Rivers", "The Copper Garden", "Night Ferry",
          "The Glass Harbor", "Seven Lanterns", "The Long Meadow", "Paper Cities", "The Quiet Forge",
          "Northern Lights Hotel", "The Hollow Bell",
          # held-out titles (the last 4)
          "The Iron Almanac", "Clouds over Varna", "The Lost Cartographer", "Harbor of Bells"]
AUTHORS = ["Clara Wendt", "Peter Osei", "Mira Sato", "Hugo Lind", "Rosa Ferreira", "Jakob Stern", "Amara Cole",
           "Leon Duval"]
GENRES = ["mystery", "science fiction", "fantasy", "historical", "romance", "horror"]
HELD_OUT = {"person": FIRST[-6:], "product": PRODUCTS[-4:], "book": TITLES[-4:]}

KINDS: dict[str, dict[str, Any]] = {
    "person": {
        "keys": ["name", "age", "city", "job"], "numbers": ["age"],
        "templates": [
            "{name} is {a_age}-year-old {job} who lives in {city}.",
            "{name}, {a_job} from {city}, turned {age} this year.",
            "Born and raised in {city}, {name} is {age} and works as {a_job}.",
            "Meet {name}: {age} years old, {a_job}, and a proud resident of {city}.",
            "After moving to {city}, {name} found work as {a_job}; {name} is now {age}.",
        ],
    },
    "product": {
        "keys": ["product", "brand", "price", "color"], "numbers": ["price"],
        "templates": [
            "The {color} {product} from {brand} costs {price} dollars.",
            "{brand} sells its {product} in {color} for {price} dollars.",
            "For {price} dollars you can buy the {brand} {product}, which comes in {color}.",
            "Our pick this week: {a_color} {product} by {brand}, priced at {price} dollars.",
        ],
    },
    "book": {
        "keys": ["title", "author", "year", "genre"], "numbers": ["year"],
        "templates": [
            "\"{title}\" is a {genre} novel by {author}, first published in {year}.",
            "{author} published the {genre} novel \"{title}\" in {year}.",
            "In {year}, {author} wrote \"{title}\", a {genre} novel that is still in print.",
            "The {genre} novel \"{title}\" came out in {year}; its author is {author}.",
        ],
    },
}

INSTRUCTIONS = [
    "Extract the details from the text below as a JSON object with exactly these keys: {keys}.{numbers} "
    "Reply with the JSON object only.\n\nText: {text}",
    "Read the text and answer with a JSON object that has exactly these keys: {keys}.{numbers} "
    "Output only the JSON object, nothing else.\n\nText: {text}",
    "Turn the following text into a JSON object with exactly the keys {keys}.{numbers} "
    "Do not write anything except the JSON object.\n\nText: {text}",
]


def _rng_int(*parts: object) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def _record(kind: str, split: str, i: int) -> dict[str, Any]:
    """The i-th record of a kind and split: every field filled, the main entity from the split's pool."""
    h = functools.partial(_rng_int, kind, split, i)
    if kind == "person":
        firsts = HELD_OUT["person"] if split == "eval" else FIRST[:-6]
        return {"name": f"{firsts[h('first') % len(firsts)]} {LAST[h('last') % len(LAST)]}", "age": 19 + h("age") % 60,
                "city": CITIES[h("city") % len(CITIES)], "job": JOBS[h("job") % len(JOBS)]}
    if kind == "product":
        products = HELD_OUT["product"] if split == "eval" else PRODUCTS[:-4]
        return {"product": products[h("product") % len(products)], "brand": BRANDS[h("brand") % len(BRANDS)],
                "price": 9 + h("price") % 240, "color": COLORS[h("color") % len(COLORS)]}
    titles = HELD_OUT["book"] if split == "eval" else TITLES[:-4]
    return {"title": titles[h("title") % len(titles)], "author": AUTHORS[h("author") % len(AUTHORS)],
            "year": 1950 + h("year") % 74, "genre": GENRES[h("genre") % len(GENRES)]}


def _article(word: str) -> str:
    return ("an " if str(word)[0] in "aeiou8" or str(word) in ("11", "18") else "a ") + str(word)


def _quoted(keys: list[str]) -> str:
    return ", ".join(f'"{k}"' for k in keys)


def _generate(split: str, n: int, name: str) -> list[tuple[dict, str, dict]]:
    """(prompt line, text, expected answer) for the first n prompts of a split."""
    out: list[tuple[dict, str, dict]] = []
    seen: set[str] = set()
    i = 0
    while len(out) < n:
        kind = list(KINDS)[i % len(KINDS)]
        spec, record = KINDS[kind], _record(kind, split, i)
        h = functools.partial(_rng_int, "prompt", split, i)
        text = spec["templates"][h("template") % len(spec["templates"])].format(**record, **{f"a_{k}": _article(v) for k, v in record.items()})
        keys = sorted(spec["keys"], key=lambda k: h("order", k))[: 2 + h("n_keys") % 3]  # 2-4 of the 4 keys
        numbers = [k for k in keys if k in spec["numbers"]]
        hint = f" Give {_quoted(numbers)} as a number." if numbers else ""
        content = INSTRUCTIONS[h("instruction") % len(INSTRUCTIONS)].format(keys=_quoted(keys), numbers=hint, text=text)
        i += 1
        if content in seen:
            continue
        seen.add(content)
        line = {"id": f"{name}/{split}/{len(out):04d}", "messages": [{"role": "user", "content": content}]}
        out.append((line, text, {k: record[k] for k in keys}))
    return out


def prompts(split: Literal["train", "eval"], n: int, *, name: str = "json-extract") -> list[dict]:
    """`n` prompts of a split as `{"id", "messages"}` lines, always the same, in the same order."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return [line for line, _, _ in _generate(split, n, name)]


@functools.cache
def _answers() -> dict[tuple[str, tuple[str, ...]], dict]:
    """(text, requested keys) -> expected object, for every prompt the generator makes."""
    answers = {}
    for split in ("train", "eval"):
        for _, text, expected in _generate(split, 2000, "json-extract"):
            answers[(text, tuple(expected))] = expected
    return answers


_KEYS = re.compile(r'keys:? ((?:"[^"]+"(?:, )?)+)')
_TEXT = re.compile(r"\n\nText: (.*)\Z", re.S)


def expected_answer(prompt: str) -> dict | None:
    """The object a generated prompt asks for (None if the prompt is not one of ours)."""
    keys, text = _KEYS.search(prompt), _TEXT.search(prompt)
    if keys is None or text is None:
        return None
    requested = tuple(re.findall(r'"([^"]+)"', keys.group(1)))
    return _answers().get((text.group(1).strip(), requested))


def find_object(response: str) -> tuple[dict | None, bool]:
    """(the first JSON object in the response, whether the response is that object alone).

    >>> find_object(' {"a": 1} ')
    ({'a': 1}, True)
    >>> find_object('Sure! {"a": 1} Hope it helps.')
    ({'a': 1}, False)
    >>> find_object('{"a": 1')
    (None, False)
    """
    decoder = json.JSONDecoder()
    stripped = response.strip()
    for start in [m.start() for m in re.finditer(r"\{", stripped)]:
        try:
            obj, end = decoder.raw_decode(stripped, start)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj, start == 0 and end == len(stripped)
    return None, False


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and float(got) == float(want)
    return isinstance(got, str) and " ".join(got.split()).casefold() == " ".join(str(want).split()).casefold()


def score(prompt: str, response: str) -> float:
    """The reward of one answer (see the module docstring); a prompt the generator did not make
    is graded on form only (its content share counts as right when the keys are)."""
    obj, alone = find_object(response)
    if obj is None:
        return 0.0
    expected = expected_answer(prompt)
    keys = _KEYS.search(prompt)
    requested = set(expected) if expected is not None else set(re.findall(r'"([^"]+)"', keys.group(1)) if keys else obj)
    total = 0.2 + 0.2 * alone + 0.2 * (set(obj) == requested)
    if expected is None:
        return round(total + 0.4 * (set(obj) == requested), 6)
    right = sum(_same(obj.get(k), v) for k, v in expected.items())
    return round(total + 0.4 * right / len(expected), 6)


def reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The task's reward: `score` of every (prompt, response) pair, in [0, 1]."""
    return [score(p, r) for p, r in zip(prompts, responses)]


__all__ = ["KINDS", "expected_answer", "find_object", "prompts", "reward", "score"]
