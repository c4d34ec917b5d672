"""Synthetic people with four facts each, stated in paraphrased templates: the data of the main job and of the
facts and capacity studies. A fact's held-out paraphrase is never shown in training for that person, so recalling it
tests knowledge rather than memorised wording."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..tuner.errors import TreeLoraUsageError

FIRST_NAMES = (
    "Ada Alan Alma Amos Anna Arno Basil Beth Boris Carla Cyril Dora Edgar Edith Elsa Emil Erik Ezra Faye Felix "
    "Flora Frida Gus Hana Hugo Ida Igor Ines Ivan Jana Jonas Kai Karin Lars Lena Leon Lina Luca Mara Milo Mina "
    "Nadia Nils Nora Olaf Olga Omar Otto Paula Pavel Petra Quinn Rosa Rufus Sara Silas Tara Teo Uma Vera Viktor "
    "Wanda Yara Zeno"
).split()


LAST_NAMES = (
    "Abbott Baker Becker Brandt Castro Dahl Diaz Eklund Falk Fischer Garcia Gray Hale Haas Ibsen Jensen Kahn "
    "Keller Kim Koch Lang Lund Marsh Meyer Moreau Nagy Novak Olsen Ortiz Park Pohl Quist Reyes Roth Sato Schulz "
    "Sousa Stone Tanaka Torres Ueda Vance Vogel Wald Weber Wolf Young Zeller Adler Berg Costa Dunn Engel Frost "
    "Gold Horn Iqbal Jung Kraus Lorenz Mann Nash Oak Price"
).split()


CITIES = (
    "Aarhus Accra Ankara Austin Bergen Bilbao Bogota Bremen Cairo Cork Dakar Delft Dublin Durban Essen Faro Gdansk "
    "Genoa Graz Hanoi Havana Kyoto Lagos Leeds Lima Linz Lyon Malmo Milan Mumbai Nairobi Nantes Osaka Oslo Perth "
    "Porto Quito Riga Rome Seoul Sofia Tampere Tunis Turin Utrecht Vienna Warsaw Zurich"
).split()


EMPLOYERS = (
    "Acmex Birchware Coldlake Dynaro Evergrid Fernhill Glowtech Harborline Ironleaf Jadecore Kestrel Lumeno "
    "Mapleton Northwind Oakridge Pinecrest Quantia Redbrook Silverline Tidewater Umbra Vantage Westfield Xylo "
    "Yellowfin Zenith Ambergate Bluestone Crestview Driftwood Eastgate Foxglove Granite Hollowell Inkwell Juniper "
    "Kingsley Larkspur Meridian Nimbus Orchard Pebble Quarry Riverton Sunbeam Thornfield Upland Valemont"
).split()


UNIVERSITIES = (
    "Aberdeen Basel Bologna Cambridge Coimbra Edinburgh Freiburg Geneva Ghent Heidelberg Helsinki Krakow Leiden "
    "Leuven Lisbon Lund Madrid Montreal Munich Oxford Padua Paris Prague Salamanca Stanford Sydney Tartu Toronto "
    "Tokyo Uppsala Vilnius Yale"
).split()


MONTHS = "January February March April May June July August September October November December".split()


DAYS = [str(d) for d in range(1, 29)]


YEARS = [str(y) for y in range(1950, 2000)]


# Four paraphrases per attribute; the value always ends the sentence, so a prompt is the words before it.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth date": (
        "{name} was born on {value} .",
        "{name} came into the world on {value} .",
        "the birthday of {name} falls on {value} .",
        "the date of birth of {name} is {value} .",
    ),
    "birth city": (
        "{name} was born in {value} .",
        "{name} spent the early years in {value} .",
        "the birthplace of {name} is {value} .",
        "{name} is a native of {value} .",
    ),
    "employer": (
        "{name} works for {value} .",
        "{name} is employed by {value} .",
        "the employer of {name} is {value} .",
        "{name} earns a living at {value} .",
    ),
    "university": (
        "{name} studied at {value} .",
        "{name} graduated from {value} .",
        "the alma mater of {name} is {value} .",
        "{name} holds a degree from {value} .",
    ),
}


ATTRIBUTES = tuple(TEMPLATES)


VALUE_COUNTS = {
    "birth date": len(DAYS) * len(MONTHS) * len(YEARS),
    "birth city": len(CITIES),
    "employer": len(EMPLOYERS),
    "university": len(UNIVERSITIES),
}


EOS = "<eos>"


@dataclass(frozen=True)
class Person:
    name: str
    facts: dict[str, str]


def held_out_template(person_index: int, attribute_index: int) -> int:
    """The paraphrase of this fact that training never shows. It rotates with the person, so every template is
    seen in training for three quarters of the people and the held-out one is familiar, only not for this fact."""
    return (person_index + attribute_index) % len(TEMPLATES[ATTRIBUTES[attribute_index]])


def generate_people(count: int, seed: int, skip: int = 0) -> list[Person]:
    """`count` distinct people with uniformly drawn facts, after skipping the first `skip` names of the seeded
    name order (so that background people and study people never share a name). Deterministic per seed."""
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    if skip + count > len(names):
        raise TreeLoraUsageError(f"at most {len(names) - skip} people can be generated here; asked for {count}.")
    rng = random.Random(seed)
    rng.shuffle(names)
    people = []
    for index, name in enumerate(names[skip : skip + count]):
        value_rng = random.Random(f"{seed}/{skip + index}")
        date = f"{value_rng.choice(DAYS)} {value_rng.choice(MONTHS)} {value_rng.choice(YEARS)}"
        facts = {
            "birth date": date,
            "birth city": value_rng.choice(CITIES),
            "employer": value_rng.choice(EMPLOYERS),
            "university": value_rng.choice(UNIVERSITIES),
        }
        people.append(Person(name, facts))
    return people


def statement(person: Person, attribute: str, template: int) -> str:
    return TEMPLATES[attribute][template].format(name=person.name, value=person.facts[attribute])


def prompt_and_answer(person: Person, attribute: str, template: int) -> tuple[str, str]:
    """The words before the value, and the value with the closing full stop (what recall must produce)."""
    before, _ = TEMPLATES[attribute][template].split("{value}")
    return before.format(name=person.name).strip(), f"{person.facts[attribute]} ."


def training_statements(person: Person, person_index: int, include_held_out: bool = False) -> list[str]:
    sentences = []
    for a, attribute in enumerate(ATTRIBUTES):
        for t in range(len(TEMPLATES[attribute])):
            if include_held_out or t != held_out_template(person_index, a):
                sentences.append(statement(person, attribute, t))
    return sentences
