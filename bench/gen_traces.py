#!/usr/bin/env python3
"""Generate synthetic search-agent traces for multi-hop factual questions.

Every entity (people, cities, countries, rivers, companies, films, years) is
invented from the seed; no real-world facts and no copied text are involved.

Output: JSONL, one trace per line:

    {"question": "...", "trace": [step, ...]}

Step types:
    {"type": "reasoning", "content": "..."}
    {"type": "search", "query": "..."}
    {"type": "search_result", "documents": [{"title": "...", "content": "..."}, ...]}
    {"type": "CorrectAnswer", "content": "..."}
    {"type": "reflection" | "plan", "content": "..."}     (rare, ~3% of traces)

Each trace has 0-6 search rounds. Each round: 1-3 reasoning steps, a search,
a search_result with 1-5 documents (the one with the needed fact, if the search
succeeded, among distractors). The trace ends with a reasoning step and a
CorrectAnswer. About 5% of traces answer without searching, about 5% end
irregularly (reasoning after the answer, or no answer at all), about 3% hold a
plan/reflection step and about 3% hold a search_result with no documents.

Same seed, same output: the file written with --size is a prefix of the one
written with a larger --size or --n.

Speed: documents (most of the bytes) are JSON-encoded once, at start-up, into
pools; a trace is assembled by joining pre-encoded fragments, and only the
reasoning text and queries are formatted per trace. Strings are encoded as
json.dumps(s, ensure_ascii=False) does (json.encoder.encode_basestring).

Usage:
    python3 bench/gen_traces.py --n 200 --seed 7 --out traces.jsonl
    python3 bench/gen_traces.py --size 1G --out /tmp/traces.jsonl
    python3 bench/gen_traces.py --n 1000 --stats > /dev/null
"""

import argparse
import random
import re
import sys
import time
from json.encoder import encode_basestring  # == json.dumps(s, ensure_ascii=False) for str

ENC = encode_basestring

# ---------------------------------------------------------------------------
# Word material (all invented or generic vocabulary)
# ---------------------------------------------------------------------------

FIRST = [
    "Anselm", "Béatrice", "Cosmin", "Dália", "Eero", "Fiora", "Gaël", "Hana", "Ilse",
    "Jónas", "Kalinda", "Lúcio", "Maëlle", "Nikos", "Oona", "Pál", "Quintus", "Renée",
    "Søren", "Tamsin", "Ugo", "Vesna", "Wendel", "Yara", "Zoë", "Ömer", "Łucja", "Ansa",
    "Bertil", "Corentin", "Delphine", "Emeric", "Faustine", "Gideon", "Halvard", "Ines",
    "Joaquín", "Katrin", "Leandro", "Mireille", "Nils", "Odile", "Piet", "Rosalind",
    "Sabine", "Teodor", "Ulrike", "Valentin", "Wilhelmina", "Xavier", "Yusuf", "Zdeněk",
    "Aino", "Bastien", "Clío", "Dorota", "Émile", "Florin", "Greta", "Henrik", "Iolanthe",
    "Jarek", "Kirsi", "Linnea", "Matthias", "Noor", "Orsolya", "Perrin", "Rafe", "Sunniva",
]
SURNAME_A = [
    "Var", "Dela", "Oster", "Kelli", "Mire", "Haver", "Quenne", "Tõnis", "Ibar", "Brandt",
    "Sol", "Hollin", "Castel", "Wyn", "Ferra", "Lind", "Moravec", "Ashby", "Corv", "Duval",
    "Elling", "Fitz", "Gallo", "Hart", "Ivers", "Jessup", "Kovač", "Lorr", "Marchetti", "Nyberg",
]
SURNAME_B = [
    "row", "court", "ander", "more", "lli", "kamp", "ville", "son", "reche", "stedt", "ani",
    "gate", "ford", "berg", "ová", "eau", "wick", "holm", "ström", "enko",
]
CITY_A = [
    "Kar", "Vel", "Mor", "Tal", "Bren", "Os", "Lis", "Dar", "Hal", "Quen", "Ser", "Val",
    "Ard", "Fen", "Gil", "Ist", "Jor", "Lum", "Nor", "Pel", "Rav", "Sol", "Tor", "Ul", "Yr",
    "Zan", "Bel", "Cor", "Dun", "Eld", "Sël", "Ré", "Å", "Mar", "Kest",
]
CITY_B = [
    "mere", "holt", "avik", "ona", "burg", "stad", "ellis", "orra", "haven", "ford", "anto",
    "esk", "ville", "grad", "uma", "ara", "wick", "dal", "enne", "by", "port", "heim",
]
COUNTRY_A = [
    "Vald", "Merr", "Esk", "Toll", "Aur", "Brav", "Cald", "Dom", "Ever", "Gal", "Hesp",
    "Ith", "Kal", "Lor", "Nov", "Ost", "Pell", "Rhun", "Sar", "Tam", "Vor", "Zel", "Ambr",
]
COUNTRY_B = ["oria", "owan", "arra", "ania", "esia", "ador", "ith", "enne", "mark", "avia", "ova", "land"]
RIVER_A = [
    "Orv", "Senn", "Amar", "Dubr", "Kess", "Lyr", "Tav", "Wen", "Ish", "Mald", "Rhe", "Ulm",
    "Sav", "Brisk", "Calw", "Yth", "Nar", "Ost", "Fal", "Grel",
]
RIVER_B = ["el", "et", "ra", "in", "a", "is", "ane", "ow", "uma", "er", "ice", "ent"]
CO_WORDS = [
    "Optics", "Tramworks", "Instruments", "Textiles", "Shipping", "Ceramics", "Foundry",
    "Telegraph", "Chemicals", "Motors", "Publishing", "Radio", "Glassworks", "Aeronautics",
    "Biscuits", "Mills", "Cartography", "Robotics", "Software", "Batteries",
]
STUDIO_WORDS = ["Pictures", "Studios", "Film Company", "Cinema Works", "Motion Pictures"]
ADJ = [
    "Silent", "Amber", "Last", "Northern", "Crooked", "Hollow", "Distant", "Burning", "Quiet",
    "Paper", "Iron", "Velvet", "Winter", "Lantern", "Broken", "Salt", "Golden", "Glass",
]
NOUN = [
    "Harbour", "Orchard", "Signal", "Bridge", "Archive", "Tide", "Garden", "Lighthouse", "Mirror",
    "Engine", "Letter", "Meridian", "Station", "Horizon", "Carousel", "Atlas", "Ferry", "Echo",
]
GENRES = ["drama", "comedy", "thriller", "documentary", "science-fiction", "historical", "musical", "crime"]
OCCUPATIONS = [
    "engineer", "painter", "novelist", "physicist", "architect", "composer", "cartographer",
    "botanist", "chess player", "sculptor", "journalist", "mathematician", "photographer",
]
INDUSTRIES = {
    "Optics": "optics", "Tramworks": "rail equipment", "Instruments": "scientific instruments",
    "Textiles": "textile", "Shipping": "shipping", "Ceramics": "ceramics", "Foundry": "metalworking",
    "Telegraph": "telecommunications", "Chemicals": "chemical", "Motors": "automotive",
    "Publishing": "publishing", "Radio": "broadcasting", "Glassworks": "glassmaking",
    "Aeronautics": "aircraft", "Biscuits": "food", "Mills": "milling", "Cartography": "map-making",
    "Robotics": "robotics", "Software": "software", "Batteries": "energy storage",
}
REGIONS = [
    "the Sarnic Coast", "the Velmar Highlands", "the Inner Basin", "the Northern Reach",
    "the Amber Archipelago", "the Tessel Plateau", "the Western Marches", "the Lowland Delta",
]
LANGUAGES = ["Valdic", "Merrish", "Eskarran", "Tollic", "Aurene", "Calden", "Ostrine", "Pellish", "Zelan"]
# a few words in other scripts, used as "local names" and in some documents
LOCAL_WORDS = ["青川", "白石", "長橋", "河口", "Ποταμός", "Λίμνη", "Ἄρβελος", "Νέα Πόλη", "北港", "山城"]
EMOJI = ["🤔", "✅", "🔎", "📌", "🙂"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SEASONS = ["spring", "summer", "autumn", "winter"]

# ---------------------------------------------------------------------------
# The fictional world
# ---------------------------------------------------------------------------


def unique_names(rng, n, make):
    seen, out, tries = set(), [], 0
    while len(out) < n and tries < n * 200:
        tries += 1
        s = make()
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


class World:
    def __init__(self, rng):
        r = rng
        # countries, cities, rivers
        self.countries = unique_names(r, 36, lambda: r.choice(COUNTRY_A) + r.choice(COUNTRY_B))
        self.cities = unique_names(r, 150, lambda: r.choice(CITY_A) + r.choice(CITY_B))
        self.rivers = [n + " River" for n in unique_names(r, 70, lambda: r.choice(RIVER_A) + r.choice(RIVER_B))]
        nk = len(self.countries)
        self.city_country = [i % nk for i in range(len(self.cities))]
        r.shuffle(self.city_country)
        self.country_cities = [[] for _ in range(nk)]
        for c, k in enumerate(self.city_country):
            self.country_cities[k].append(c)
        self.capital = []
        for k in range(nk):
            self.capital.append(r.choice(self.country_cities[k]))
        self.country_region = [r.choice(REGIONS) for _ in range(nk)]
        self.country_lang = [r.choice(LANGUAGES) for _ in range(nk)]
        self.country_pop = [r.randint(2, 90) * 100_000 + r.randint(0, 99_999) for _ in range(nk)]
        self.country_founded = [r.randint(1650, 1960) for _ in range(nk)]
        # each river flows through cities of one or two countries
        self.city_river = [0] * len(self.cities)
        self.river_cities = [[] for _ in self.rivers]
        for c in range(len(self.cities)):
            k = self.city_country[c]
            rv = (k * 2 + r.randint(0, 2)) % len(self.rivers)
            self.city_river[c] = rv
            self.river_cities[rv].append(c)
        self.river_len = [r.randint(40, 2400) for _ in self.rivers]
        self.city_pop = [r.randint(8, 4000) * 1000 + r.randint(0, 999) for _ in self.cities]
        self.city_founded = [r.randint(900, 1850) for _ in self.cities]
        self.city_local = [r.choice(LOCAL_WORDS) if r.random() < 0.08 else None for _ in self.cities]

        # people
        self.people = unique_names(
            r, 320, lambda: r.choice(FIRST) + " " + r.choice(SURNAME_A) + r.choice(SURNAME_B)
        )
        np_ = len(self.people)
        self.birth_city = [r.randrange(len(self.cities)) for _ in range(np_)]
        self.birth_year = [r.randint(1830, 1985) for _ in range(np_)]
        self.occupation = [r.choice(OCCUPATIONS) for _ in range(np_)]
        order = list(range(np_))
        r.shuffle(order)
        founders = order[:90]
        directors = order[90:150]
        for d in directors:
            self.occupation[d] = "film director"
            self.birth_year[d] = r.randint(1880, 1985)
        for f in founders:
            self.occupation[f] = r.choice(["industrialist", "entrepreneur", "inventor", "engineer"])
            self.birth_year[f] = min(self.birth_year[f], 1975)

        # companies: 70 regular, 20 film studios; one founder each
        self.companies, self.co_industry, self.co_founder = [], [], []
        self.co_year, self.co_hq, self.co_employees = [], [], []
        used = set()
        for i, f in enumerate(founders):
            studio = i >= 70
            while True:
                word = r.choice(STUDIO_WORDS) if studio else r.choice(CO_WORDS)
                style = r.random()
                sur = self.people[f].split(" ", 1)[1]
                if style < 0.4:
                    name = f"{sur} {word}"
                elif style < 0.7:
                    name = f"{self.cities[r.randrange(len(self.cities))]} {word}"
                else:
                    name = f"{r.choice(ADJ)}{r.choice(NOUN).lower()} {word}"
                if name not in used:
                    used.add(name)
                    break
            self.companies.append(name)
            self.co_industry.append("film production" if studio else INDUSTRIES[word])
            self.co_founder.append(f)
            self.co_year.append(min(2022, self.birth_year[f] + r.randint(22, 55)))
            self.co_hq.append(r.randrange(len(self.cities)))
            self.co_employees.append(r.randint(12, 40_000))
        self.studios = list(range(70, 90))
        self.person_company = {f: i for i, f in enumerate(founders)}

        # films
        self.films = unique_names(r, 110, lambda: self._film_title(r))
        nf = len(self.films)
        self.film_director = [r.choice(directors) for _ in range(nf)]
        self.film_year = [min(2024, self.birth_year[d] + r.randint(24, 60)) for d in self.film_director]
        self.film_studio = []
        for fi in range(nf):
            # a studio must exist by the release year
            ok = [s for s in self.studios if self.co_year[s] <= self.film_year[fi]]
            self.film_studio.append(r.choice(ok) if ok else r.choice(self.studios))
        self.film_setting = [r.randrange(len(self.cities)) for _ in range(nf)]
        self.film_genre = [r.choice(GENRES) for _ in range(nf)]
        self.director_films = {}
        for fi, d in enumerate(self.film_director):
            self.director_films.setdefault(d, []).append(fi)
        self.founders = founders
        self.directors = directors

    def _film_title(self, r):
        x = r.random()
        if x < 0.35:
            return f"The {r.choice(ADJ)} {r.choice(NOUN)}"
        if x < 0.55:
            return f"{r.choice(NOUN)} over {r.choice(self.cities)}"
        if x < 0.7:
            n = r.choice(NOUN)
            return f"{'An' if n[0] in 'AEIOU' else 'A'} {n} for {r.choice(FIRST)}"
        if x < 0.85:
            return f"{r.choice(SEASONS).capitalize()} in {r.choice(self.cities)}"
        if x < 0.93:
            return f"{r.choice(ADJ)} {r.choice(NOUN)}s"
        return f"{r.choice(NOUN)} {r.choice(LOCAL_WORDS)}"

    # fact lookups: (kind, id, rel) -> (value text, value kind, value id)
    def lookup(self, kind, i, rel):
        if kind == "person":
            if rel == "birth_city":
                c = self.birth_city[i]
                return self.cities[c], "city", c
            if rel == "birth_year":
                return str(self.birth_year[i]), "year", self.birth_year[i]
        elif kind == "city":
            if rel == "country":
                k = self.city_country[i]
                return self.countries[k], "country", k
            if rel == "river":
                rv = self.city_river[i]
                return "the " + self.rivers[rv], "river", rv
        elif kind == "country":
            if rel == "capital":
                c = self.capital[i]
                return self.cities[c], "city", c
        elif kind == "company":
            if rel == "founder":
                p = self.co_founder[i]
                return self.people[p], "person", p
            if rel == "hq":
                c = self.co_hq[i]
                return self.cities[c], "city", c
            if rel == "year":
                return str(self.co_year[i]), "year", self.co_year[i]
        elif kind == "film":
            if rel == "director":
                p = self.film_director[i]
                return self.people[p], "person", p
            if rel == "studio":
                s = self.film_studio[i]
                return self.companies[s], "company", s
            if rel == "year":
                return str(self.film_year[i]), "year", self.film_year[i]
            if rel == "setting":
                c = self.film_setting[i]
                return self.cities[c], "city", c
        raise KeyError((kind, rel))

    def name(self, kind, i):
        if kind == "person":
            return self.people[i]
        if kind == "city":
            return self.cities[i]
        if kind == "country":
            return self.countries[i]
        if kind == "river":
            return "the " + self.rivers[i]
        if kind == "company":
            return self.companies[i]
        if kind == "film":
            return self.films[i]
        return str(i)


# ---------------------------------------------------------------------------
# Documents (pre-encoded JSON objects)
# ---------------------------------------------------------------------------


def doc_json(title, sentences):
    return '{"title": ' + ENC(title) + ', "content": ' + ENC(" ".join(sentences)) + "}"


def filler_candidates(w, r, kind, i):
    """One fresh batch of plausible, fact-free sentences about entity (kind, i)."""
    a, nn, n2 = r.choice(ADJ).lower(), r.choice(NOUN).lower(), r.choice(NOUN).lower()
    if kind == "person":
        lo, hi = w.birth_year[i] + 18, min(2024, w.birth_year[i] + 80)
        y, y2 = r.randint(lo, hi), r.randint(lo, hi)
        last = w.people[i].split(" ", 1)[1]
        return [
            f"{last} spent several years travelling before settling into a career.",
            f"Contemporaries described {last} as patient, meticulous and fond of long walks.",
            f"A collection of {last}'s letters was published in {y}.",
            f"{last} kept detailed notebooks on {nn}s and {n2}s, most of which survive.",
            f"In later life {last} lectured occasionally on the history of the {nn}.",
            f"A {a} portrait of {last} hangs in a regional gallery.",
            f"{last} was an early member of a society devoted to the study of the {nn}.",
            f"Several streets and a small {n2} are named after {last}.",
            f"{last} married in {y2} and had {r.choice(['no', 'two', 'three', 'four'])} children.",
            f"Critics have compared {last}'s early work to a {a} {nn}.",
            f"{last} received an honorary award in {max(y, y2)}.",
        ]
    if kind == "city":
        lo = w.city_founded[i]
        y, y2 = r.randint(lo, 2020), r.randint(lo, 2020)
        c = w.cities[i]
        return [
            f"{c} is known for its {a} {nn}s and a {n2} market held every {r.choice(DAYS)}.",
            f"The old town of {c} was rebuilt after a fire in {y}.",
            f"Visitors often remark on the {a} light along the riverside promenade.",
            f"The economy of {c} was long based on trade, fishing and small workshops.",
            f"A {a} clock tower stands at the centre of the main square.",
            f"{c} hosts an annual {nn} festival every {r.choice(SEASONS)}.",
            f"The local dialect preserves several older words for the {nn}.",
            f"A tram line connecting the districts of {c} opened in {y2}.",
            "The municipal archive holds records dating back several centuries.",
            f"The climate around {c} is mild, with {a} winters and dry summers.",
            f"The university of {c} is known for its faculty of {r.choice(['law', 'medicine', 'engineering', 'music', 'geology'])}.",
        ]
    if kind == "country":
        y = r.randint(w.country_founded[i], 2020)
        k = w.countries[i]
        return [
            f"{k} has a long tradition of {nn}-making and {n2} fairs.",
            f"The national symbol of {k} is a {a} {nn}.",
            f"{k} adopted its current constitution in {y}.",
            f"Agriculture, light industry and tourism make up most of the economy of {k}.",
            f"The landscape ranges from coastal plains to {a} uplands.",
            f"{k} is divided into {r.randint(4, 19)} provinces, each with its own assembly.",
            f"Rail links between {k} and its neighbours were expanded in the {y // 10 * 10}s.",
            f"The flag of {k} shows a {a} {nn} on a plain field.",
            f"The currency of {k} is the {nn}, divided into 100 smaller units.",
        ]
    if kind == "river":
        y = r.randint(1400, 2015)
        rv = w.rivers[i]
        return [
            f"The {rv} is navigable for small boats along much of its lower course.",
            f"Several {a} bridges cross the river, the oldest built in {y}.",
            f"The {rv} floods most years in early {r.choice(SEASONS)}.",
            "Its basin supports wetlands that are home to many bird species.",
            f"A {nn} mill once operated on its banks.",
            f"The water is noted for its {a} colour after heavy rain.",
            f"Fishing on the {rv} is regulated by a river commission.",
            f"Its largest tributary is the {r.choice(RIVER_A)}{r.choice(RIVER_B)}.",
        ]
    if kind == "company":
        lo = w.co_year[i]
        y, y2 = r.randint(lo, 2024), r.randint(lo, 2024)
        co = w.companies[i]
        return [
            f"{co} expanded rapidly after winning a contract for {nn} equipment in {y}.",
            f"The company's {a} logo was redesigned in {y2}.",
            f"{co} employs about {w.co_employees[i]:,} people.",
            f"{co} opened a second site in the {y // 10 * 10}s.",
            f"The firm is known for its {a} {nn} product line.",
            f"In {max(y, y2)} {co} acquired a smaller {n2} manufacturer.",
            f"{co} sponsors a yearly prize for young designers.",
            "The company publishes an annual report in three languages.",
        ]
    y = r.randint(w.film_year[i] + 1, 2025)
    f = w.films[i]
    return [
        f"{f} received mixed reviews on release but gained a following later.",
        f"The score makes heavy use of {a} strings.",
        f"Much of {f} was shot on location over a single {r.choice(SEASONS)}.",
        f"{f} runs for {r.randint(78, 171)} minutes.",
        f"A restored version of {f} was shown at a festival in {y}.",
        f"The central {nn} in the film was built at full scale for the production.",
        f"Critics praised the {a} cinematography.",
        f"The screenplay went through {r.randint(3, 11)} drafts.",
    ]


def filler_sentences(w, r, kind, i, n):
    """n filler sentences about (kind, i), without repeats when n is small."""
    out = []
    while len(out) < n:
        c = filler_candidates(w, r, kind, i)
        r.shuffle(c)
        out.extend(c[: n - len(out)])
    return out


def key_sentences(w, r, kind, i):
    """Sentences stating the entity's key facts (every fact the questions use)."""
    if kind == "person":
        p, c, y = w.people[i], w.cities[w.birth_city[i]], w.birth_year[i]
        s = [r.choice([
            f"{p} (born {y} in {c}) was a {w.occupation[i]}.",
            f"{p} was a {w.occupation[i]}, born in {c} in {y}.",
            f"Born in {c} in {y}, {p} became a well-known {w.occupation[i]}.",
        ])]
        if i in w.person_company:
            co = w.person_company[i]
            s.append(f"In {w.co_year[co]} {p.split(' ', 1)[0]} founded {w.companies[co]}.")
        if i in w.director_films:
            fl = [w.films[f] for f in w.director_films[i][:3]]
            s.append(f"{p.split(' ', 1)[1]} directed {', '.join(fl)}.")
        return s
    if kind == "city":
        c, k = w.cities[i], w.countries[w.city_country[i]]
        s = [r.choice([f"{c} is a city in {k}.", f"{c} is the {r.choice(['second', 'third', 'fourth', 'fifth'])}-largest city of {k}.",
                       f"{c} is a town in the {r.choice(['north', 'south', 'east', 'west'])} of {k}."])]
        if w.capital[w.city_country[i]] == i:
            s[0] = r.choice([f"{c} is the capital and largest city of {k}.", f"{c} is the capital of {k}."])
        s.append(r.choice([f"The {w.rivers[w.city_river[i]]} flows through {c}.",
                           f"{c} lies on the {w.rivers[w.city_river[i]]}.",
                           f"The city is built on both banks of the {w.rivers[w.city_river[i]]}."]))
        s.append(f"It has a population of about {w.city_pop[i]:,} and was founded around {w.city_founded[i]}.")
        if w.city_local[i]:
            s.append(f"Old maps also record the name {w.city_local[i]}.")
        return s
    if kind == "country":
        k, cap = w.countries[i], w.cities[w.capital[i]]
        return [
            f"{k} is a country in {w.country_region[i]}.",
            r.choice([f"Its capital is {cap}.", f"The capital of {k} is {cap}.", f"{cap} has been the capital of {k} since {w.country_founded[i]}."]),
            f"The official language is {w.country_lang[i]} and the population is about {w.country_pop[i]:,}.",
        ]
    if kind == "river":
        rv = w.rivers[i]
        cs = [w.cities[c] for c in w.river_cities[i][:4]]
        s = [f"The {rv} is a river about {w.river_len[i]:,} km long."]
        if cs:
            s.append(f"It flows through {', '.join(cs)}.")
        return s
    if kind == "company":
        co = w.companies[i]
        f, hq = w.people[w.co_founder[i]], w.cities[w.co_hq[i]]
        return [
            r.choice([f"{co} is a {w.co_industry[i]} company founded in {w.co_year[i]} by {f}.",
                      f"{co} was founded by {f} in {w.co_year[i]}.",
                      f"Founded in {w.co_year[i]} by {f}, {co} works in the {w.co_industry[i]} industry."]),
            r.choice([f"It is headquartered in {hq}.", f"The company's headquarters are in {hq}.",
                      f"{co} has its head office in {hq}."]),
        ]
    f = w.films[i]
    d, st, set_ = w.people[w.film_director[i]], w.companies[w.film_studio[i]], w.cities[w.film_setting[i]]
    return [
        r.choice([f"{f} is a {w.film_year[i]} {w.film_genre[i]} film directed by {d}.",
                  f"{f} ({w.film_year[i]}) is a {w.film_genre[i]} film by director {d}."]),
        r.choice([f"It was produced by {st} and is set in {set_}.", f"The film, produced by {st}, takes place in {set_}."]),
    ]


KINDS = ("person", "city", "country", "river", "company", "film")
PLURAL = {"person": "people", "city": "cities", "country": "countries", "river": "rivers",
          "company": "companies", "film": "films"}


def title_for(w, r, kind, i):
    name = w.name(kind, i)
    if name.startswith("the "):
        name = name[4:]
    t = r.random()
    if kind == "film" and t < 0.5:
        return f"{name} (film)"
    if t < 0.55:
        return name
    if t < 0.7:
        return f"{name} - overview"
    if t < 0.8:
        return f"History of {name}" if kind in ("city", "country", "company", "river") else f"{name}: biography" if kind == "person" else f"{name}: production notes"
    if t < 0.9:
        return f"{name} | Encyclopedia of the Nine Regions"
    return f"{name} — archive entry"


def build_doc_pools(w, r):
    """fact[(kind, i)] -> 4 (title, pre-encoded doc) variants stating its key facts;
    long[(kind, i)] -> one long (title, doc) variant; generic -> fact-free pre-encoded docs."""
    fact, long_ = {}, {}
    for kind in KINDS:
        n = len({"person": w.people, "city": w.cities, "country": w.countries, "river": w.rivers,
                 "company": w.companies, "film": w.films}[kind])
        for i in range(n):
            vs = []
            for _ in range(4):
                ks = key_sentences(w, r, kind, i)
                total = max(len(ks), r.randint(2, 8))
                sents = ks + filler_sentences(w, r, kind, i, total - len(ks))
                # keep the first sentence first (it names the entity), shuffle the rest
                rest = sents[1:]
                r.shuffle(rest)
                title = title_for(w, r, kind, i)
                vs.append((title, doc_json(title, [sents[0]] + rest)))
            fact[(kind, i)] = vs
            ks = key_sentences(w, r, kind, i)
            title = title_for(w, r, kind, i)
            long_[(kind, i)] = (title, doc_json(title, ks + filler_sentences(w, r, kind, i, r.randint(25, 80))))
    generic = []
    for _ in range(1500):
        kind = r.choice(KINDS)
        ids = {"person": w.people, "city": w.cities, "country": w.countries, "river": w.rivers,
               "company": w.companies, "film": w.films}[kind]
        i = r.randrange(len(ids))
        n = r.randint(2, 8)
        name = w.name(kind, i)
        if name.startswith("the "):
            name = name[4:]
        title = r.choice([
            f"Travel notes: {name}", f"{name} in the press, {r.randint(1900, 2023)}",
            f"Forum thread: questions about {name}", f"{name}: a local history",
            f"List of {PLURAL[kind]} in {r.choice(REGIONS)[4:]}", f"Museum catalogue: items related to {name}",
            f"{name} — {r.choice(['photo captions', 'visitor reviews', 'timeline', 'trivia'])}",
        ])
        if r.random() < 0.01:
            title += " " + r.choice(EMOJI)
        generic.append(doc_json(title, filler_sentences(w, r, kind, i, n)))
    return fact, long_, generic


# ---------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------

# A template picks a start entity and gives (question, hops, answer, summary).
# A hop is (kind, id, rel); rel's value is looked up in the world.


def q_templates(w):
    P_any = list(range(len(w.people)))
    T = []

    def river_of_capital_of_birth_country(r):
        p = r.choice(P_any)
        c = w.birth_city[p]
        k = w.city_country[c]
        cap = w.capital[k]
        q = r.choice([
            f"Which river flows through the capital of the country where {w.people[p]} was born?",
            f"{w.people[p]} was born in a country whose capital lies on a river. Which river is it?",
            f"What river runs through the capital city of {w.people[p]}'s country of birth?",
        ])
        return q, [("person", p, "birth_city"), ("city", c, "country"), ("country", k, "capital"), ("city", cap, "river")], w.rivers[w.city_river[cap]]

    def capital_of_birth_country(r):
        p = r.choice(P_any)
        c = w.birth_city[p]
        k = w.city_country[c]
        q = r.choice([
            f"What is the capital of the country where {w.people[p]} was born?",
            f"Name the capital of the country in which {w.people[p]} was born.",
        ])
        return q, [("person", p, "birth_city"), ("city", c, "country"), ("country", k, "capital")], w.cities[w.capital[k]]

    def hq_country(r):
        co = r.randrange(len(w.companies))
        c = w.co_hq[co]
        q = r.choice([f"In which country is {w.companies[co]} headquartered?",
                      f"{w.companies[co]} has its head office in which country?"])
        return q, [("company", co, "hq"), ("city", c, "country")], w.countries[w.city_country[c]]

    def director_birth_year(r):
        f = r.randrange(len(w.films))
        d = w.film_director[f]
        q = r.choice([f"In what year was the director of {w.films[f]} born?",
                      f"When was the person who directed \"{w.films[f]}\" born?"])
        return q, [("film", f, "director"), ("person", d, "birth_year")], str(w.birth_year[d])

    def studio_founder_birthplace(r):
        f = r.randrange(len(w.films))
        s = w.film_studio[f]
        p = w.co_founder[s]
        q = r.choice([f"Where was the founder of the studio that produced {w.films[f]} born?",
                      f"In which city was the founder of the company behind the film {w.films[f]} born?"])
        return q, [("film", f, "studio"), ("company", s, "founder"), ("person", p, "birth_city")], w.cities[w.birth_city[p]]

    def river_of_setting(r):
        f = r.randrange(len(w.films))
        c = w.film_setting[f]
        q = r.choice([f"Which river flows through the city where {w.films[f]} is set?",
                      f"The film {w.films[f]} takes place in a city on which river?"])
        return q, [("film", f, "setting"), ("city", c, "river")], w.rivers[w.city_river[c]]

    def founder(r):
        co = r.randrange(len(w.companies))
        q = r.choice([f"Who founded {w.companies[co]}?", f"Who was the founder of {w.companies[co]}?"])
        return q, [("company", co, "founder")], w.people[w.co_founder[co]]

    def film_year(r):
        f = r.randrange(len(w.films))
        q = r.choice([f"In which year was {w.films[f]} released?", f"When did the film {w.films[f]} come out?"])
        return q, [("film", f, "year")], str(w.film_year[f])

    def years_founder_age(r):
        co = r.randrange(len(w.companies))
        p = w.co_founder[co]
        q = f"How old was the founder of {w.companies[co]} in the year the company was founded?"
        return q, [("company", co, "founder"), ("person", p, "birth_year"), ("company", co, "year")], str(w.co_year[co] - w.birth_year[p])

    def older(r):
        f = r.randrange(len(w.films))
        co = r.randrange(len(w.companies))
        d, p = w.film_director[f], w.co_founder[co]
        if d == p or w.birth_year[d] == w.birth_year[p]:
            return founder(r)
        q = f"Who was born first: the director of {w.films[f]} or the founder of {w.companies[co]}?"
        ans = w.people[d] if w.birth_year[d] < w.birth_year[p] else w.people[p]
        return q, [("film", f, "director"), ("person", d, "birth_year"), ("company", co, "founder"), ("person", p, "birth_year")], ans

    def director_birth_country(r):
        f = r.randrange(len(w.films))
        d = w.film_director[f]
        c = w.birth_city[d]
        q = r.choice([f"In which country was the director of {w.films[f]} born?",
                      f"What is the country of birth of the person who directed {w.films[f]}?"])
        return q, [("film", f, "director"), ("person", d, "birth_city"), ("city", c, "country")], w.countries[w.city_country[c]]

    def years_between(r):
        co = r.randrange(len(w.companies))
        f = r.randrange(len(w.films))
        q = f"How many years passed between the founding of {w.companies[co]} and the release of {w.films[f]}?"
        return q, [("company", co, "year"), ("film", f, "year")], str(abs(w.film_year[f] - w.co_year[co]))

    def studio_hq_river(r):
        f = r.randrange(len(w.films))
        s = w.film_studio[f]
        c = w.co_hq[s]
        q = f"Which river runs through the city where the company that produced {w.films[f]} has its headquarters?"
        return q, [("film", f, "studio"), ("company", s, "hq"), ("city", c, "river")], w.rivers[w.city_river[c]]

    T = [
        (river_of_capital_of_birth_country, 2), (capital_of_birth_country, 2), (hq_country, 2),
        (director_birth_year, 2), (studio_founder_birthplace, 2), (river_of_setting, 2), (founder, 1),
        (film_year, 1), (years_founder_age, 1), (older, 1), (director_birth_country, 2),
        (years_between, 1), (studio_hq_river, 1),
    ]
    flat = []
    for fn, weight in T:
        flat.extend([fn] * weight)
    return flat


# ---------------------------------------------------------------------------
# Reasoning text
# ---------------------------------------------------------------------------

NEED = {
    ("person", "birth_city"): "where {e} was born",
    ("person", "birth_year"): "the year {e} was born",
    ("city", "country"): "which country {e} is in",
    ("city", "river"): "which river flows through {e}",
    ("country", "capital"): "the capital of {e}",
    ("company", "founder"): "who founded {e}",
    ("company", "hq"): "where {e} is headquartered",
    ("company", "year"): "when {e} was founded",
    ("film", "director"): "who directed {e}",
    ("film", "studio"): "which company produced {e}",
    ("film", "year"): "when {e} was released",
    ("film", "setting"): "where {e} is set",
}
FACT = {
    ("person", "birth_city"): "{e} was born in {v}",
    ("person", "birth_year"): "{e} was born in {v}",
    ("city", "country"): "{e} is in {v}",
    ("city", "river"): "{v} flows through {e}",
    ("country", "capital"): "the capital of {e} is {v}",
    ("company", "founder"): "{e} was founded by {v}",
    ("company", "hq"): "{e} is headquartered in {v}",
    ("company", "year"): "{e} was founded in {v}",
    ("film", "director"): "{e} was directed by {v}",
    ("film", "studio"): "{e} was produced by {v}",
    ("film", "year"): "{e} was released in {v}",
    ("film", "setting"): "{e} is set in {v}",
}
QUERY = {
    ("person", "birth_city"): ["{e} birthplace", "where was {e} born", "{e} biography early life", "{e} born in"],
    ("person", "birth_year"): ["{e} date of birth", "when was {e} born", "{e} born year", "{e} biography"],
    ("city", "country"): ["{e} country", "{e} city", "where is {e} located", "{e}"],
    ("city", "river"): ["{e} river", "river flowing through {e}", "{e} geography river", "which river is {e} on"],
    ("country", "capital"): ["capital of {e}", "{e} capital city", "{e} country overview"],
    ("company", "founder"): ["{e} founder", "who founded {e}", "{e} company history"],
    ("company", "hq"): ["{e} headquarters", "{e} head office location", "where is {e} based"],
    ("company", "year"): ["{e} founded year", "when was {e} founded", "{e} history"],
    ("film", "director"): ["{e} film director", "who directed {e}", "\"{e}\" film"],
    ("film", "studio"): ["{e} film production company", "{e} film studio", "who produced {e}"],
    ("film", "year"): ["{e} film release year", "{e} film", "when was {e} released"],
    ("film", "setting"): ["{e} film setting", "where is {e} set", "{e} film location"],
}

# the same needs, for an entity the agent does not know yet
NEED_UNKNOWN = {
    ("person", "birth_city"): "where that person was born",
    ("person", "birth_year"): "that person's year of birth",
    ("city", "country"): "which country that city is in",
    ("city", "river"): "which river flows through that city",
    ("country", "capital"): "the capital of that country",
    ("company", "founder"): "who founded that company",
    ("company", "hq"): "where that company is headquartered",
    ("company", "year"): "when that company was founded",
}
# keywords for a retried query: "Name" keyword
QUERY_KW = {
    ("person", "birth_city"): ["birthplace", "born", "early life"],
    ("person", "birth_year"): ["born", "birth year", "biography"],
    ("city", "country"): ["country", "location", "city"],
    ("city", "river"): ["river", "geography"],
    ("country", "capital"): ["capital", "capital city"],
    ("company", "founder"): ["founder", "founded by"],
    ("company", "hq"): ["headquarters", "head office"],
    ("company", "year"): ["founded", "history"],
    ("film", "director"): ["director", "directed by"],
    ("film", "studio"): ["production company", "produced by"],
    ("film", "year"): ["release date", "released"],
    ("film", "setting"): ["setting", "location"],
}

OPENERS = [
    "Let me break this question down.",
    "This is a multi-hop question, so I will resolve it one fact at a time.",
    "The question chains several facts together.",
    "I need to work through this step by step.",
    "Okay, let me think about what this question is really asking.",
]
PLANS = [
    "First I need to find {need}.",
    "The first thing to establish is {need}.",
    "I don't know {need} offhand, so I should search for it.",
    "To start, I should look up {need}.",
]
ACKS = [
    "The search result confirms that {fact}.",
    "According to the '{title}' document, {fact}.",
    "So {fact}.",
    "Good, the results state that {fact}.",
    "One of the documents says {fact}, which is what I needed.",
]
NEXTS = [
    "Next I need {need}.",
    "Now I need to look up {need}.",
    "That gives me {v}; the next step is finding {need}.",
    "With that, the remaining question is {need}.",
    "Now I should search for {need}.",
]
EXTRAS = [
    "The other results are about unrelated {kinds}, so I can ignore them.",
    "I should be careful not to confuse {e} with similarly named {kinds}.",
    "The remaining documents look like distractors.",
    "This matches what I expected from the question.",
    "I will keep track of what I know so far.",
    "Known so far: {known}.",
    "I have {nleft} more fact(s) to find after this one.",
]
MISS = [
    "None of the results mention {need}.",
    "These documents are about other {kinds} and do not answer {need}.",
    "The results do not say anything about {need}.",
]
RETRY = [
    "Let me try a more specific query.",
    "I should rephrase the search.",
    "Maybe a different wording will find the right page.",
    "I'll search again with the exact name.",
]
EMPTY = [
    "The search returned no documents at all.",
    "That query gave no results.",
    "Nothing came back for that search.",
]
FINALS = [
    "Putting it together: {chain}. So the answer is {a}.",
    "Combining the facts: {chain}. Therefore the answer is {a}.",
    "I now have everything I need: {chain}. The answer is {a}.",
    "{chainc}. That means the answer is {a}.",
]
NOSEARCH = [
    "I remember this one: the answer is {a}.",
    "This is something I already know, so I don't need to search.",
    "I'm fairly confident about this without looking anything up.",
    "From memory, the relevant facts are well established.",
    "I recall that the answer is {a}.",
]
TRAILING = [
    "Double-checking: every step of the chain is supported by a retrieved document.",
    "On reflection the answer is consistent with all the documents I found.",
    "I could verify this further, but the evidence is already clear.",
]
GIVEUP = [
    "I have used my search budget and still cannot confirm the last fact.",
    "I'm running out of steps; I can't confirm the answer with the documents I have.",
    "The evidence is incomplete, so I will stop here without a final answer.",
]
REFLECTIONS = [
    "Looking back, the first query was too vague; naming the entity exactly works better.",
    "So far each result has contained exactly one relevant document among distractors.",
    "I should double-check that I am not mixing up two entities with similar names.",
]
PLAN_STEPS = [
    "Plan: 1) find {need}; 2) follow the chain one hop at a time; 3) answer with a single name or number.",
    "Plan: search for each fact in turn, verify it in a document, then combine.",
]


def cap(s):
    return s[:1].upper() + s[1:]


# ---------------------------------------------------------------------------
# Trace generation
# ---------------------------------------------------------------------------


BLOCK = 500  # traces per independently seeded block
F_NOSEARCH, F_UNKNOWN, F_EMPTY, F_TRAILING, F_NOANSWER = 8, 16, 32, 64, 128


class Gen:
    def __init__(self, seed):
        self.r = random.Random(seed)
        self.w = World(self.r)
        self.fact_docs, self.long_docs, self.generic = build_doc_pools(self.w, self.r)
        self.templates = q_templates(self.w)
        # same-kind distractors: ids per kind
        self.n_by_kind = {
            "person": len(self.w.people), "city": len(self.w.cities), "country": len(self.w.countries),
            "river": len(self.w.rivers), "company": len(self.w.companies), "film": len(self.w.films),
        }
        # flat distractor pools per kind: entry 4*j+v is variant v of entity j
        self.kind_docs = {k: [self.fact_docs[(k, j)][v][1] for j in range(n) for v in range(4)]
                          for k, n in self.n_by_kind.items()}

    def reseed(self, r):
        """Use r for the traces from now on (the world stays the same)."""
        self.r = r
        rnd = self.rnd = r.random
        self.pick = lambda seq: seq[int(rnd() * len(seq))]

    def reasoning(self, sentences):
        if self.rnd() < 0.004:
            sentences = sentences + [self.pick(EMOJI)]
        return '{"type": "reasoning", "content": ' + ENC(" ".join(sentences)) + "}"

    def split_reasoning(self, sents, out):
        """Emit sents as 1-3 reasoning steps of 1-4 sentences each."""
        r = self.r
        n = len(sents)
        k = 1 if n == 1 else min(n, 3, 1 + int(r.random() * 2.2))
        # make sure no step gets more than 4 sentences
        while n > 4 * k:
            sents = sents[: 4 * k]
            n = len(sents)
        # cut points
        if k == 1:
            out.append(self.reasoning(sents))
            return
        per = n // k
        extra = n - per * k
        i = 0
        for j in range(k):
            m = per + (1 if j < extra else 0)
            out.append(self.reasoning(sents[i:i + m]))
            i += m

    def fact_doc(self, kind, i):
        """(title, pre-encoded doc) stating the key facts of (kind, i)."""
        r = self.r
        if r.random() < 0.03:
            return self.long_docs[(kind, i)]
        vs = self.fact_docs[(kind, i)]
        return vs[int(r.random() * len(vs))]

    def distractors(self, kind, i, n):
        """n documents that do not hold the facts of (kind, i): other entities of
        the same kind (60%) or generic pages."""
        rnd = self.rnd
        out = []
        kd = self.kind_docs[kind]
        nkd = len(kd)
        gen = self.generic
        ng = len(gen)
        for _ in range(n):
            x = rnd()
            if x < 0.6:
                j = int(rnd() * nkd)
                if j >> 2 == i:
                    j = (j + 4) % nkd
                if x < 0.012:
                    out.append(self.long_docs[(kind, j >> 2)][1])
                else:
                    out.append(kd[j])
            else:
                out.append(gen[int(x * 1e9) % ng])
        return out

    def search_result(self, docs):
        return '{"type": "search_result", "documents": [' + ", ".join(docs) + "]}"

    def query(self, kind, e, rel, base, attempt):
        """The query of attempt `attempt` (0, 1, ...) to find rel of e; `base`
        picks the first wording, each retry uses another one."""
        r = self.r
        qs = QUERY[(kind, rel)]
        q = qs[(base + attempt) % len(qs)].format(e=e)
        if attempt > 0 and r.random() < 0.5:
            kw = QUERY_KW[(kind, rel)]
            q = f"\"{e}\" {kw[int(r.random() * len(kw))]}"
        elif r.random() < 0.15:
            q = q.lower()
        return q

    def block(self, seed, b):
        """Traces of block b (BLOCK traces) as (utf-8 bytes, line lengths, stats
        codes). Each block has its own random stream (seeded from seed and b),
        so a block does not depend on the ones before it."""
        self.reseed(random.Random(f"{seed}:{b}"))
        trace = self.trace
        lines, lens, codes = [], [], []
        for _ in range(BLOCK):
            line, code = trace()
            line = line.encode("utf-8")
            lines.append(line)
            lens.append(len(line))
            codes.append(code)
        return b"".join(lines), lens, codes

    def trace(self):
        """One trace: (JSON line, stats code = number of searches | F_* flags)."""
        r, w, pick = self.r, self.w, self.pick
        flags = 0
        fn = self.templates[int(r.random() * len(self.templates))]
        question, hops, answer = fn(r)
        steps = []
        no_search = r.random() < 0.05
        unknown = r.random() < 0.03
        empty = r.random() < 0.03
        e = r.random()
        ending = "trailing" if e < 0.025 else "noanswer" if e < 0.05 else "normal"
        facts = []  # fact sentences found so far
        nsearch = 0
        if unknown:
            flags |= F_UNKNOWN

        if unknown and r.random() < 0.5:
            need0 = NEED[(hops[0][0], hops[0][2])].format(e=w.name(hops[0][0], hops[0][1]))
            steps.append('{"type": "plan", "content": ' + ENC(pick(PLAN_STEPS).format(need=need0)) + "}")
            unknown = False

        truncated = False
        if no_search:
            flags |= F_NOSEARCH
            sents = [pick(NOSEARCH).format(a=answer)]
            for kind, i, rel in hops[: 1 + int(r.random() * len(hops))][:3]:
                v = w.lookup(kind, i, rel)[0]
                sents.append(cap(FACT[(kind, rel)].format(e=w.name(kind, i), v=v)) + ".")
            self.split_reasoning(sents, steps)
            final = f"So the answer is {answer}."
        else:
            # budget for retries (empty results / misses) within 6 searches
            spare = 6 - len(hops)
            empty_at = int(r.random() * len(hops)) if empty else -1
            last_title = ""
            for h, (kind, i, rel) in enumerate(hops):
                ent = w.name(kind, i)
                need = NEED[(kind, rel)].format(e=ent)
                v = w.lookup(kind, i, rel)[0]
                # reasoning before this search
                if h == 0:
                    sents = [pick(OPENERS)] if r.random() < 0.7 else []
                    sents.append(pick(PLANS).format(need=need))
                    if len(hops) > 1 and r.random() < 0.5:
                        rest = []
                        for k2, i2, rel2 in hops[1:3]:
                            e2 = w.name(k2, i2)
                            rest.append(NEED[(k2, rel2)].format(e=e2) if e2 in question or (k2, rel2) not in NEED_UNKNOWN
                                        else NEED_UNKNOWN[(k2, rel2)])
                        sents.append("After that I will need to find out " + " and then ".join(rest) + ".")
                else:
                    pk, pi, prel = hops[h - 1]
                    pv = w.lookup(pk, pi, prel)[0]
                    sents = [pick(ACKS).format(fact=FACT[(pk, prel)].format(e=w.name(pk, pi), v=pv),
                                                   title=last_title)]
                    if r.random() < 0.45:
                        sents.append(pick(EXTRAS).format(kinds=PLURAL[pk], e=w.name(pk, pi), known="; ".join(facts[-3:]),
                                                             nleft=len(hops) - h))
                    sents.append(pick(NEXTS).format(need=need, v=pv))
                self.split_reasoning(sents, steps)
                if unknown and h == len(hops) // 2 and h > 0:
                    steps.append('{"type": "reflection", "content": ' + ENC(pick(REFLECTIONS)) + "}")
                    unknown = False

                attempt = 0
                qbase = int(r.random() * 8)
                # an empty result first?
                if h == empty_at and spare > 0:
                    steps.append('{"type": "search", "query": ' + ENC(self.query(kind, ent, rel, qbase, attempt)) + "}")
                    steps.append('{"type": "search_result", "documents": []}')
                    flags |= F_EMPTY
                    nsearch += 1
                    spare -= 1
                    attempt += 1
                    self.split_reasoning([pick(EMPTY), pick(RETRY)], steps)
                # a miss (distractors only) before the hit?
                while spare > 0 and r.random() < 0.12:
                    steps.append('{"type": "search", "query": ' + ENC(self.query(kind, ent, rel, qbase, attempt)) + "}")
                    steps.append(self.search_result(self.distractors(kind, i, 1 + int(r.random() * 5))))
                    nsearch += 1
                    spare -= 1
                    attempt += 1
                    sents = [pick(MISS).format(need=need, kinds=PLURAL[kind])]
                    if r.random() < 0.7:
                        sents.append(pick(RETRY))
                    self.split_reasoning(sents, steps)
                # the hit
                steps.append('{"type": "search", "query": ' + ENC(self.query(kind, ent, rel, qbase, attempt)) + "}")
                nd = 1 + int(r.random() * 5)
                docs = self.distractors(kind, i, nd - 1)
                last_title, fd = self.fact_doc(kind, i)
                docs.insert(int(r.random() * nd), fd)
                steps.append(self.search_result(docs))
                nsearch += 1
                facts.append(FACT[(kind, rel)].format(e=ent, v=v))
            chain = "; ".join(facts)
            final = pick(FINALS).format(chain=chain, chainc=cap(chain), a=answer)
            # a trace without an answer may stop right after the last search result
            truncated = ending == "noanswer" and r.random() < 0.5

        if unknown:  # not placed yet (no search, single hop): near the end
            steps.append('{"type": "reflection", "content": ' + ENC(pick(REFLECTIONS)) + "}")
        if ending == "noanswer":
            flags |= F_NOANSWER
            if not truncated:
                steps.append(self.reasoning([pick(GIVEUP)]))
        else:
            steps.append(self.reasoning([final]))
            steps.append('{"type": "CorrectAnswer", "content": ' + ENC(answer) + "}")
            if ending == "trailing":
                flags |= F_TRAILING
                steps.append(self.reasoning([pick(TRAILING)]))
        return '{"question": ' + ENC(question) + ', "trace": [' + ", ".join(steps) + "]}\n", flags | nsearch


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def parse_size(s):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (expected e.g. 500M, 1G, 20000)")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def blocks(gen, seed):
    """Yield the blocks 0, 1, 2, ... in order."""
    b = 0
    while True:
        yield gen.block(seed, b)
        b += 1


def main():
    ap = argparse.ArgumentParser(description="Generate synthetic search-agent traces (JSONL).")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--n", type=int, help="number of traces (default 1000)")
    g.add_argument("--size", type=parse_size,
                   help="generate until the output holds at least this many bytes (it stops after the "
                        "trace that reaches it); K/M/G are powers of 1024: 500M, 1G")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--out", default="-", help="output file (default: stdout)")
    ap.add_argument("--stats", action="store_true", help="also print distribution stats to stderr")
    a = ap.parse_args()
    if a.n is None and a.size is None:
        a.n = 1000
    if (a.n is not None and a.n < 0) or (a.size is not None and a.size < 0):
        ap.error("--n/--size must not be negative")

    t0 = time.perf_counter()
    gen = Gen(a.seed)
    t_setup = time.perf_counter() - t0
    out = sys.stdout.buffer if a.out == "-" else open(a.out, "wb")
    written = count = 0
    limit_n = a.n if a.n is not None else -1
    limit_b = a.size if a.size is not None else -1
    codes = []
    buf, nbuf = [], 0
    done = count == limit_n or limit_b == 0
    try:
        if not done:
            for blob, lens, bcodes in blocks(gen, a.seed):
                take = len(lens)
                if limit_n >= 0:
                    take = min(take, limit_n - count)
                end = sum(lens[:take])
                if limit_b >= 0 and written + nbuf + end >= limit_b:
                    # stop after the trace that reaches the size
                    end, take = 0, 0
                    while written + nbuf + end < limit_b:
                        end += lens[take]
                        take += 1
                buf.append(blob if take == len(lens) else blob[:end])
                nbuf += end
                count += take
                if a.stats:
                    codes.extend(bcodes[:take])
                done = count == limit_n or (limit_b >= 0 and written + nbuf >= limit_b)
                if nbuf >= (8 << 20) or done:
                    out.write(b"".join(buf))
                    written += nbuf
                    buf, nbuf = [], 0
                if done:
                    break
    finally:
        if out is not sys.stdout.buffer:
            out.close()
        else:
            out.flush()
    dt = time.perf_counter() - t0
    print(f"gen_traces: {count} traces, {written} bytes ({written / 1e6:.1f} MB) in {dt:.2f} s "
          f"(setup {t_setup:.2f} s): {written / 1e6 / dt:.1f} MB/s", file=sys.stderr)
    if a.stats and count:
        hist = [0] * 7
        flags = dict.fromkeys(("nosearch", "unknown", "empty", "trailing", "noanswer"), 0)
        for c in codes:
            hist[c & 7] += 1
            for name, bit in zip(flags, (F_NOSEARCH, F_UNKNOWN, F_EMPTY, F_TRAILING, F_NOANSWER)):
                if c & bit:
                    flags[name] += 1
        print("  searches per trace: " + ", ".join(f"{k}: {v} ({100 * v / count:.1f}%)" for k, v in enumerate(hist)),
              file=sys.stderr)
        for name, v in flags.items():
            print(f"  {name}: {v} ({100 * v / count:.1f}%)", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
        sys.exit(1)
