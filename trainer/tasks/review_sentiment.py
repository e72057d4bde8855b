"""Prompts of the built-in `review-sentiment` task (its task file: builtin/review-sentiment.yaml).

Continue a movie review that opens hesitantly or negatively; the reward is the VADER sentiment of
the continuation, so an aligned model turns reviews around. Prompts are generated
deterministically from templates written here (invented titles, genres, openings,
instructions): nothing is downloaded, and every run sees the same prompts. Held-out prompts use
titles that never appear in training.

    >>> train = prompts("train", 400)
    >>> len(train), len(prompts("eval", 100)), train[0]["messages"][0]["role"]
    (400, 100, 'user')
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Literal

TITLES = [
    # training titles (the first 45)
    "The Quiet Harbor", "Midnight in Calder Falls", "Iron Orchard", "The Last Lighthouse Keeper", "Paper Moons",
    "A Winter for Wolves", "The Glass Cartographer", "Saltwater Saints", "Neon Pilgrims", "The Orchard Thief",
    "Echoes of Vellmar", "Brass Hearts", "The Ninth Lantern", "Copper Skies", "Hollow Crown Road",
    "The Velvet Alibi", "Distant Engines", "Garden of Small Hours", "The Lantern Bearers", "Stormglass",
    "The Clockmaker's Daughter", "Red Dust Requiem", "Summer at Marrow Lake", "The Borrowed Sky", "Ghost Frequency",
    "Under the Linden Tree", "Northbound Silence", "The Porcelain War", "Kingdom of Ash and Honey", "Tidewater",
    "The Long Way to Oriel", "Starlight Motel", "Whispering Pines Academy", "The Tin Astronaut", "Blackwater Ballad",
    "The Second Sunrise", "City of Folded Maps", "Hummingbird Protocol", "The Salt Road", "Marigold Avenue",
    "The Lighthouse Tapes", "Parallel Winters", "Feathers in the Furnace", "The Cobalt Vow", "Last Train to Evernight",
    # held-out titles (the last 15)
    "The Amber Cipher", "Wildflower Station", "Beneath the Iron Moon", "The Cartwright Affair", "Silver Thistle",
    "A House Made of Rain", "The Drowned Carnival", "Lullaby for a Giant", "Cinder Valley", "The Understudy",
    "Falling Upward", "The Pale Orchestra", "Harbor of Lost Kites", "Meridian Blue", "The Wandering Ledger",
]
N_TRAIN_TITLES = 45

GENRES = [
    "heist thriller", "romantic comedy", "space opera", "period drama", "horror film", "animated musical",
    "courtroom drama", "war epic", "coming-of-age story", "detective mystery", "disaster movie", "sports drama",
    "fantasy adventure", "biopic", "western", "superhero sequel",
]

OPENINGS = [
    "I walked into {title} expecting very little from yet another {a_genre}, and",
    "I'll be honest: the first half hour of {title} nearly put me to sleep.",
    "{title} is not the {genre} I was hoping for.",
    "I almost walked out of {title} twenty minutes in.",
    "On paper, {title} has everything {a_genre} needs. On screen, though,",
    "The trailer for {title} made me nervous, and the opening scene did not help.",
    "I have mixed feelings about {title}.",
    "Nobody asked for {a_genre} like {title}, and for a while it shows.",
    "The dialogue in the first act of {title} is clumsy at best.",
    "I wanted to love {title}, I really did, but",
    "After all the hype, my first reaction to {title} was disappointment.",
    "{title} starts slowly, almost painfully so.",
    "I'm not usually a fan of the {genre}, so I went into {title} with low expectations.",
    "Let me start with the problems, because {title} has a few.",
    "The pacing of {title} is uneven, and the lead seems lost in the early scenes.",
    "I was ready to write {title} off as a forgettable {genre}.",
    "Critics have been harsh on {title}, and in the first act I understood why.",
    "My friends dragged me to {title}; I went in grumbling.",
    "The opening of {title} is confusing and far too long.",
    "I'm still not sure what to make of {title}.",
    "For the first forty minutes, {title} feels like every other {genre} you have already seen.",
    "The visual effects in {title} look cheap at first,",
    "Honestly, I expected {title} to be a mess.",
    "{title} has a weak script, at least to begin with.",
    "I nearly skipped {title} after reading the early reviews.",
    "The casting of {title} left me doubtful from the very first scene.",
    "There is a lot that goes wrong at the start of {title}.",
    "As {a_genre}, {title} stumbles out of the gate.",
    "I came out of the first half of {title} frustrated.",
    "It took me a long time to warm up to {title}.",
]

INSTRUCTIONS = [
    "Continue this movie review. Write the next two or three sentences.\n\nReview: {opening}",
    "Here is the beginning of a review of the {genre} \"{title}\". Continue it in a few sentences.\n\n{opening}",
    "Finish the following film review in two or three sentences.\n\n\"{opening}\"",
    "You are a film critic. Continue your review of {title} from where it stops:\n\n{opening}",
]


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def prompts(split: Literal["train", "eval"], n: int, *, name: str = "review-sentiment") -> list[dict]:
    """`n` prompts of a split as `{"id", "messages"}` lines, always the same, in the same order
    (held-out prompts use titles never seen in training)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    titles = TITLES[:N_TRAIN_TITLES] if split == "train" else TITLES[N_TRAIN_TITLES:]
    combos = sorted(itertools.product(titles, GENRES, OPENINGS), key=lambda c: _key(name, split, *c))
    return compose(combos, INSTRUCTIONS, n, salt=split, id_prefix=f"{name}/{split}")


def compose(combos, instructions: list[str], n: int, *, salt: str, id_prefix: str) -> list[dict]:
    """The first `n` distinct prompts of (title, genre, opening) `combos`, each with the instruction
    a hash of `salt` and the combo picks, as `{"id": "<id_prefix>/NNNN", "messages"}` lines."""
    out: list[dict] = []
    seen: set[str] = set()
    for title, genre, opening in combos:  # many openings do not name the genre: skip repeats
        fill = {"title": title, "genre": genre, "a_genre": _article(genre)}
        text = opening.format(**fill)
        text = text[0].upper() + text[1:]
        instruction = instructions[int(_key(salt, title, genre, opening)[:8], 16) % len(instructions)]
        content = instruction.format(opening=text, **fill)
        if content in seen:
            continue
        seen.add(content)
        out.append({"id": f"{id_prefix}/{len(out):04d}", "messages": [{"role": "user", "content": content}]})
        if len(out) == n:
            break
    return out


__all__ = ["N_TRAIN_TITLES", "TITLES", "prompts"]
