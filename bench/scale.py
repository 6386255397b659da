#!/usr/bin/env python3
"""The scale set (issue 21): fictional personal notes of many shapes, with questions, for
measuring retrieval, hybrid answering and learning capacity as the number of notes grows.

usage: bench/scale.py N [--asked K] [--seed S] > notes-N.jsonl

Writes N notes in `hone eval --qa`'s format ({"id","note","questions":[{"q","a":[...]}]}).
Only K of them (default min(N, 100), spread evenly) carry questions, so a 2,000-note run asks
as many questions as a 100-note one: the other notes are there to be searched past. Notes are
built from templates over made-up names, places and numbers, and many share a shape and its
words (dozens of lockers, appointments, passwords), so a keyword that names the kind of note
does not find the note: the question has to match its particulars. No two notes answer the
same question (a question names one note's subject). Every run with the same N and seed
writes the same bytes.
"""
import argparse
import json
import random

FIRST = """Ailsa Bronwen Cato Dagny Eirik Fenna Gideon Hedda Ilse Joran Kaia Lorcan Maelle Nils
Odile Piet Quilla Rasmus Sigrun Tobin Ulla Vesna Wendel Xanthe Yorick Zelda Arvo Britt Cosmo
Dorte Edvin Frida Gunnar Halla Ivo Jutta Kjeld Liv Marit Norbert Oona Per Runa Sten Tove Ugo
Vibeke Walden Ylva Zeno""".split()
LAST = """Aaberg Brask Corvin Dahlquist Eng Falk Grundt Holm Isaksen Juhl Kvist Lindqvist Mork
Norrby Ostrand Palm Quist Rask Strand Thorsen Ulvang Vik Westergaard Yttre Zorn Asplund
Bjerke Carlsen Dyrholm Ekdahl""".split()
STREETS = """Linden Birch Quarry Harbour Mill Rowan Kestrel Orchard Tannery Chapel Juniper Ferry
Foundry Beacon Heron Willow Saddle Copper Lantern Meadow""".split()
KINDS = """street lane road row way""".split()
TOWNS = """Vardholm Eskerby Tollund Brakvik Ostermark Hallin Sundby Grevlund Askola Marrow Fen
Keldby Norvik Ruskin Haldane Bramwell""".split()
COLOURS = "red blue green yellow grey black white orange purple brown".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = """January February March April May June July August September October November
December""".split()
WORDS = """marmot lantern pebble quartz saffron tundra walrus cobalt juniper falcon ember
harbor velvet cactus nimbus otter fjord maple glacier thistle""".split()
THINGS = """umbrella bicycle pump tent camera drill sewing machine ladder kayak paddle
projector""".split()
SHOPS = "bakery pharmacy bike shop hardware store library post office cheese shop".split()


def name(r):
    return f"{r.choice(FIRST)} {r.choice(LAST)}"


def time_of(r):
    return f"{r.randint(7, 20)}:{r.choice(['00', '15', '30', '45'])}"


def street(r):
    return f"{r.choice(STREETS)} {r.choice(KINDS).capitalize()}"


def note(r, i):
    """One note and its questions (aliases accepted as right), from template i % 12."""
    k = i % 12
    if k == 0:
        n, num, c = r.choice(["gym", "pool", "climbing hall", "station"]), r.randint(100, 999), r.choice(COLOURS)
        who = name(r)
        return (f"My locker at the {n} in {r.choice(TOWNS)} is number {num}, the {c} one next to {who}'s.",
                [(f"What number is my locker at the {n} next to {who}'s?", [str(num)])])
    if k == 1:
        who, day, t = name(r), r.choice(DAYS), time_of(r)
        what = r.choice(["dentist", "physiotherapist", "optician", "vet", "barber", "tax adviser"])
        return (f"My {what} is {who}; the next appointment is on {day} at {t}.",
                [(f"Who is my {what}, {who.split()[0]} what?", [who.split()[1]]),
                 (f"When is my appointment with {who}?", [day, t])])
    if k == 2:
        place = r.choice(["cabin", "studio", "boathouse", "allotment shed", "office annex"])
        town = r.choice(TOWNS)
        pw = f"{r.choice(WORDS)}-{r.choice(WORDS)}-{r.randint(10, 99)}"
        return (f"The wifi password at the {place} in {town} is {pw}.",
                [(f"What is the wifi password at the {place} in {town}?", [pw])])
    if k == 3:
        shop, st, day, t = r.choice(SHOPS), street(r), r.choice(DAYS), r.randint(13, 18)
        return (f"The {shop} on {st} closes at {t - 12} pm on {day}s.",
                [(f"What time does the {shop} on {st} close on {day}s?", [f"{t - 12} pm", f"{t}:00"])])
    if k == 4:
        who, thing = name(r), r.choice(THINGS)
        month = r.choice(MONTHS)
        return (f"I lent my {thing} to {who} in {month}; they promised to bring it back by the end of the month.",
                [(f"Who has my {thing}, the one lent in {month}?", [who.split()[1]])])
    if k == 5:
        who, day = name(r), r.randint(1, 28)
        month = r.choice(MONTHS)
        return (f"{who}'s birthday is on the {day} of {month}; they like {r.choice(WORDS)} tea.",
                [(f"When is {who}'s birthday?", [f"{day} of {month}", f"{month} {day}"])])
    if k == 6:
        town, num = r.choice(TOWNS), r.randint(1000, 9999)
        return (f"The door code for the bike cellar at the {town} flat is {num}.",
                [(f"What is the door code of the bike cellar at the {town} flat?", [str(num)])])
    if k == 7:
        dish, spice, mins = r.choice(["lentil soup", "fish pie", "barley stew", "plum cake", "rye bread"]), r.choice(WORDS), r.randint(20, 95)
        who = name(r)
        return (f"{who}'s {dish} needs a pinch of {spice} and {mins} minutes in the oven.",
                [(f"How long does {who}'s {dish} bake?", [f"{mins} minutes", str(mins)])])
    if k == 8:
        who, plate = name(r), f"{r.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{r.choice('ABCDEFGHJKLMNPRSTUVWXYZ')} {r.randint(10000, 99999)}"
        return (f"{who} drives a {r.choice(COLOURS)} van with the number plate {plate}.",
                [(f"What is the number plate of {who}'s van?", [plate])])
    if k == 9:
        club, day, t, town = r.choice(["chess club", "choir", "book circle", "rowing club", "pottery class"]), r.choice(DAYS), time_of(r), r.choice(TOWNS)
        return (f"The {club} in {town} meets every {day} at {t} in the old school hall.",
                [(f"On which day does the {club} in {town} meet?", [day]),
                 (f"At what time does the {club} in {town} meet?", [t])])
    if k == 10:
        who, st, num = name(r), street(r), r.randint(2, 140)
        return (f"{who} moved to {st} {num}, the house with the {r.choice(COLOURS)} door.",
                [(f"Where does {who} live now?", [f"{st} {num}", st.split()[0]])])
    who, acct = name(r), f"{r.randint(1000, 9999)}-{r.randint(100000, 999999)}"
    return (f"The insurance policy for the {r.choice(THINGS)} is with {who}, policy number {acct}.",
            [(f"What is the policy number of the insurance with {who}?", [acct])])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int)
    ap.add_argument("--asked", type=int, default=None)
    ap.add_argument("--seed", type=int, default=2026)
    a = ap.parse_args()
    asked = min(a.n, a.asked if a.asked is not None else 100)
    r = random.Random(a.seed)
    step = a.n / asked if asked else a.n + 1
    with_q = {int(j * step) for j in range(asked)}
    # A note whose question another note would answer too (two door codes for the bike cellar
    # at the same flat, two policies with the same agent) makes that question ambiguous: both
    # answers are the notes' truth. Each question's subject is used once, asked or not.
    subjects = set()
    i = 0
    out = []
    while len(out) < a.n:
        text, qs = note(r, i)
        i += 1
        if any(q in subjects for q, _ in qs):
            continue
        subjects.update(q for q, _ in qs)
        j = len(out)
        questions = [{"q": q, "a": al} for q, al in qs] if j in with_q else []
        out.append({"id": f"scale-{j + 1}", "note": text, "questions": questions})
    for o in out:
        print(json.dumps(o))


if __name__ == "__main__":
    main()
