#!/usr/bin/env python3
"""Generate synthetic tau-bench-style customer-service dialogues (airline and
retail domains) in ShareGPT format, with tool calls, for the
`conversation_transform` and `llamafactory_export` stages.

Every person, id, reservation, order, product and policy is invented by this
script; no text is copied from tau-bench or any other dataset. Airport codes
are ordinary IATA codes; the airline and the shop are fictional.

Usage:
    python3 bench/gen_tau2.py --out pipelines/data/tau2 --seed 11
    python3 bench/gen_tau2.py --out /tmp/tau2 --seed 11 --stats   # edge-case index table on stderr

Same command, same bytes (json.dump with ensure_ascii=False, indent=1, a
trailing newline; only random.Random(seed) is used, never hash() or sets).

Files written under --out:
    tool_schemas.json            {"airline": [tool, ...], "retail": [tool, ...]}, OpenAI function style
    system_prompts/airline.txt   full agent policy (the pipeline puts it in place of the short prompt)
    system_prompts/retail.txt
    variant_0.json               the 36 base conversations
    variant_5.json               base + round(36*5/100)  = 2 recovery conversations  (38)
    variant_10.json              base + round(36*10/100) = 4 recovery conversations  (40)
    variant_20.json              base + round(36*20/100) = 7 recovery conversations  (43)

Each conversation: {"conversations": [{"from": human|gpt|function_call|observation,
"value": str}], "system": short original-style prompt, "tools": JSON string of the
domain's tool list}. A function_call value is `{"name": ..., "arguments": ...}`
as JSON, optionally preceded by `<think>...</think>` and a newline. An
observation is the tool's result: a JSON object (most tools), a JSON array
(search_direct_flight) or a bare string (find_user_id_by_email returns the
user id as plain text, as the tau-bench retail tool does).

Base conversations: index i (0-based) is airline when i is even, retail when
odd. Recovery conversations (a call fails with {"error": "... not found"}, the
agent asks again and recovers) are appended after the base; variant_10's are a
prefix-superset of variant_5's, and so on. Recovery conversations hold none of
the edge cases below and follow the ShareGPT alternation rule.

Edge cases seeded into the BASE (so every variant has them), with the 0-based
indices of the base conversations holding them (`--stats` recomputes this table
from the data and the script asserts it matches):
    1. consecutive gpt turns ........................................ 2, 7
    2. trailing human turn ("Thanks, bye!"-style last message) ....... 4, 9
    3a. <think>...</think> before a function_call JSON ............... 0, 11, 16
    3b. think-only gpt turn (value is only <think>...</think>) ....... 6, 13
    3c. gpt text with a think span followed by text .................. 0, 15, 20
    4a. arguments as a JSON string ("{\"reservation_id\": ...}") ...... 8, 17
    4b. arguments as a single-quoted python-dict string .............. 10, 19
    4c. arguments as a broken string ("order_id=#W...") .............. 12, 21
    5a. call to an unknown tool name ................................. 14, 23
    5b. missing required argument .................................... 18, 25
    5c. unknown extra argument ....................................... 22, 27
    5d. wrong JSON type (integer given as a string, e.g. "2") ........ 24, 26
    5e. order_id without its '#' prefix (W1234567) ................... 29, 31
    6a. "<tool_" inside a value (leaked tool-call markup) ............ 28, 33
    6b. "\\n[{" inside a value (leaked call list) ..................... 30, 35
    7a. function_call with no think and no text before the JSON ...... every base conversation (0, 11, 16
        have a think before their first call only)
    7b. observation that is a JSON object ............................ every base conversation except 6 and 30
    parallel calls (function_call, function_call, observation, observation) ... 5, 32
Only the base conversations 1, 3, 34 have none of cases 1-6 and no parallel calls
(the others each hold exactly the cases listed for them).
"""

import argparse
import json
import os
import random
import re
import sys

# ---------------------------------------------------------------------------
# Word material (invented people; generic vocabulary)
# ---------------------------------------------------------------------------

FIRST = [
    "Mira", "Tobias", "Anneli", "Rashid", "Solveig", "Kenji", "Amara", "Lucian", "Priya",
    "Mateus", "Yelena", "Idris", "Noemi", "Kwame", "Ottilie", "Dario", "Hanne", "Farid",
    "Liesel", "Tomasz", "Ayla", "Bruno", "Ciara", "Emeka", "Freya", "Gustavo", "Ilka",
]
LAST = [
    "Varga", "Okonkwo", "Lindqvist", "Haddad", "Moreau", "Takeda", "Brennan", "Castell",
    "Ivanova", "Achterberg", "Nakashima", "Rossetti", "Kowalczyk", "Delacroix", "Oyelaran",
    "Sandoval", "Holm", "Barzani", "Petrescu", "Quintero",
]
AIRPORTS = ["JFK", "LAX", "SFO", "ORD", "SEA", "BOS", "DEN", "ATL", "MIA", "PHX", "DFW",
            "LGA", "EWR", "IAH", "MSP", "DTW", "CLT", "LAS"]
STREETS = ["Maple Avenue", "Cedar Lane", "Harbor Street", "Willow Court", "Pine Ridge Road",
           "Lakeview Drive", "Orchard Way", "Granite Boulevard", "Birch Terrace", "Meadow Path"]
CITIES = [("Fairhaven", "WA"), ("Brookdale", "NY"), ("Silverton", "CO"), ("Marlow", "TX"),
          ("Easton", "PA"), ("Glenwood", "IL"), ("Ridgefield", "CA"), ("Ashbury", "OH"),
          ("Dunmore", "GA"), ("Kingsport", "AZ")]
CARD_BRANDS = ["visa", "mastercard"]

# product name -> option name -> values
PRODUCTS = [
    ("Water Bottle", {"capacity": ["500ml", "750ml", "1000ml"], "color": ["black", "blue", "green"],
                      "material": ["stainless steel", "glass"]}),
    ("Desk Lamp", {"color": ["white", "black", "silver"], "brightness": ["low", "medium", "high"],
                   "power source": ["USB", "AC adapter"]}),
    ("T-Shirt", {"color": ["red", "navy", "grey"], "size": ["S", "M", "L", "XL"],
                 "material": ["cotton", "polyester"]}),
    ("Hiking Boots", {"size": ["8", "9", "10", "11"], "material": ["leather", "synthetic"],
                      "waterproof": ["yes", "no"]}),
    ("Wireless Earbuds", {"color": ["black", "white"], "battery life": ["6 hours", "8 hours"],
                          "water resistance": ["IPX4", "IPX7"]}),
    ("Backpack", {"color": ["olive", "black", "navy"], "size": ["small", "medium", "large"],
                  "compartment": ["laptop", "hydration"]}),
    ("Mechanical Keyboard", {"switch type": ["linear", "tactile", "clicky"],
                             "backlight": ["none", "white", "RGB"], "size": ["full size", "80%"]}),
    ("Coffee Maker", {"color": ["black", "stainless steel"], "capacity": ["4 cups", "8 cups", "12 cups"],
                      "type": ["drip", "pour-over"]}),
]

NOW = "2024-05-15 15:00:00 EST"
SYSTEM_SHORT = {
    "airline": "# Airline Agent Policy\nThe current time is " + NOW + ".\n"
               "You are an airline agent for a fictional carrier: help users look up, book, "
               "change baggage on, or cancel flight reservations.",
    "retail": "# Retail Agent Policy\nThe current time is " + NOW + ".\n"
              "You are a retail agent for a fictional online shop: help users with order status, "
              "cancellations, address changes, returns and exchanges.",
}

SYSTEM_FULL = {
    "airline": """You are an airline customer service agent for Skyward Air, a fictional carrier. The current time is 2024-05-15 15:00:00 EST.
Follow this policy in every conversation:
- Before looking up or changing anything, obtain the user's user id; reservations may only be changed by the user who owns them.
- Use the tools to read reservation, user and flight data; never guess prices, dates, seat availability or ids.
- Before any action that changes a booking (booking, baggage change, cancellation), list the exact details and the amount to be charged or refunded, and wait for an explicit "yes".
- Make at most one tool call at a time unless the calls are independent lookups.
- Free checked bags per passenger: regular members 0 (basic economy), 1 (economy), 2 (business); silver members 1, 2, 3; gold members 2, 3, 3.
- Each checked bag beyond the free allowance costs $50. Bags can be added but never removed.
- Payment for extra bags or new bookings must use a credit card or gift card already on the user's profile.
- Travel insurance costs $30 per passenger and must be chosen at booking time.
- A reservation can be cancelled with a full refund if it was booked less than 24 hours ago, if it is in business class, or if it has travel insurance and the reason is health or weather.
- Otherwise, explain that the reservation is not refundable and do not cancel it unless the user accepts that no refund is given.
- If a tool returns an error, tell the user what could not be found and ask them to double-check the information.
- Do not make up policies or promise compensation that this policy does not allow.
- Transfer to a human agent only when the request cannot be handled with the available tools.
- Be concise and friendly, and finish by asking whether there is anything else you can help with.
""",
    "retail": """You are a retail customer service agent for Northwind Goods, a fictional online shop. The current time is 2024-05-15 15:00:00 EST.
Follow this policy in every conversation:
- Authenticate the user first: find their user id from their email address before discussing any order.
- Only discuss and change orders that belong to the authenticated user.
- Order ids start with '#W' followed by seven digits; always include the '#' when calling a tool.
- Use the tools to read order and product data; never guess prices, availability or item ids.
- Pending orders can be cancelled (reason: "no longer needed" or "ordered by mistake") or have their shipping address changed.
- Delivered orders can have items returned or exchanged; an item can only be exchanged for another variant of the same product that is available.
- Refunds go back to the original payment method or to an existing gift card of the user.
- A price difference for an exchange is charged to, or refunded on, a payment method the user already has.
- Before any change, list the order id, the items, the new address or the refund or charge, and wait for an explicit "yes".
- Processed, cancelled and already-returned orders cannot be modified.
- If a tool returns an error, tell the user what could not be found and ask them to double-check the information.
- Make one change request per order; collect every item to return or exchange before calling the tool.
- Transfer to a human agent only when the request cannot be handled with the available tools.
- Be concise and friendly, and finish by asking whether there is anything else you can help with.
""",
}


# ---------------------------------------------------------------------------
# Tool schemas (OpenAI function style)
# ---------------------------------------------------------------------------

def prop(typ, desc, **extra):
    d = {"type": typ, "description": desc}
    d.update(extra)
    return d


def tool(name, desc, props, required):
    return {"name": name, "description": desc,
            "parameters": {"type": "object", "properties": props, "required": required}}


TOOLS = {
    "airline": [
        tool("get_reservation_details", "Get the details of a reservation.",
             {"reservation_id": prop("string", "The reservation id, six uppercase letters and digits, such as '8JX2WO'.")},
             ["reservation_id"]),
        tool("get_user_details", "Get the details of a user, including membership, payment methods and reservations.",
             {"user_id": prop("string", "The user id, such as 'mira_varga_1234'.")},
             ["user_id"]),
        tool("search_direct_flight", "Search direct flights between two airports on a given date.",
             {"origin": prop("string", "Origin airport IATA code, such as 'JFK'."),
              "destination": prop("string", "Destination airport IATA code, such as 'SEA'."),
              "date": prop("string", "Departure date in the format 'YYYY-MM-DD'.")},
             ["origin", "destination", "date"]),
        tool("update_reservation_baggages", "Update the baggage information of a reservation.",
             {"reservation_id": prop("string", "The reservation id."),
              "total_baggages": prop("integer", "The updated total number of checked bags."),
              "nonfree_baggages": prop("integer", "The updated number of checked bags that are not free."),
              "payment_id": prop("string", "The payment id from the user's profile, such as 'credit_card_7815826'.")},
             ["reservation_id", "total_baggages", "nonfree_baggages", "payment_id"]),
        tool("cancel_reservation", "Cancel the whole reservation and refund it if the policy allows.",
             {"reservation_id": prop("string", "The reservation id.")},
             ["reservation_id"]),
        tool("book_reservation", "Book a reservation for the user.",
             {"user_id": prop("string", "The id of the user who books."),
              "origin": prop("string", "Origin airport IATA code."),
              "destination": prop("string", "Destination airport IATA code."),
              "flight_type": prop("string", "'one_way' or 'round_trip'."),
              "cabin": prop("string", "'basic_economy', 'economy' or 'business'."),
              "flight_numbers": prop("array", "The flight numbers, in travel order.", items={"type": "string"}),
              "passengers": prop("integer", "The number of passengers."),
              "insurance": prop("boolean", "Whether to buy travel insurance ($30 per passenger)."),
              "total_price": prop("number", "The total price in dollars, insurance included."),
              "payment": prop("object", "The payment to use: a payment id from the user's profile and the amount.",
                              properties={"payment_id": {"type": "string", "description": "The payment id."},
                                          "amount": {"type": "number", "description": "The amount in dollars."}},
                              required=["payment_id", "amount"])},
             ["user_id", "origin", "destination", "flight_type", "cabin", "flight_numbers", "passengers",
              "insurance", "total_price", "payment"]),
    ],
    "retail": [
        tool("find_user_id_by_email", "Find a user id by email address.",
             {"email": prop("string", "The email of the user, such as 'mira.varga42@example.com'.")},
             ["email"]),
        tool("get_order_details", "Get the status and details of an order.",
             {"order_id": prop("string", "The order id, such as '#W0000000'. It starts with a '#'.")},
             ["order_id"]),
        tool("get_product_details", "Get the inventory details of a product and its variants.",
             {"product_id": prop("string", "The product id, such as '6086499569'. It differs from an item id.")},
             ["product_id"]),
        tool("cancel_pending_order", "Cancel a pending order and refund it to the original payment method.",
             {"order_id": prop("string", "The order id, such as '#W0000000'."),
              "reason": prop("string", "'no longer needed' or 'ordered by mistake'.")},
             ["order_id", "reason"]),
        tool("modify_pending_order_address", "Change the shipping address of a pending order.",
             {"order_id": prop("string", "The order id, such as '#W0000000'."),
              "address1": prop("string", "The first line of the address, such as '123 Main St'."),
              "address2": prop("string", "The second line of the address, such as 'Apt 1', or ''."),
              "city": prop("string", "The city."),
              "state": prop("string", "The state, such as 'CA'."),
              "zip": prop("string", "The zip code, such as '12345'.")},
             ["order_id", "address1", "city", "zip"]),
        tool("return_delivered_order_items", "Return some items of a delivered order.",
             {"order_id": prop("string", "The order id, such as '#W0000000'."),
              "item_ids": prop("array", "The item ids to return.", items={"type": "string"}),
              "payment_method_id": prop("string", "Where the refund goes: the original payment method or a gift card.")},
             ["order_id", "item_ids", "payment_method_id"]),
        tool("exchange_delivered_order_items", "Exchange items of a delivered order for other variants of the same products.",
             {"order_id": prop("string", "The order id, such as '#W0000000'."),
              "item_ids": prop("array", "The item ids to exchange.", items={"type": "string"}),
              "new_item_ids": prop("array", "The new item ids, in the same order as item_ids.", items={"type": "string"}),
              "payment_method_id": prop("string", "The payment method that pays or receives the price difference.")},
             ["order_id", "item_ids", "new_item_ids", "payment_method_id"]),
    ],
}
TOOLS_JSON = {d: json.dumps(ts, ensure_ascii=False) for d, ts in TOOLS.items()}

# ---------------------------------------------------------------------------
# The plan of the base: (scenario, [(edge, tool or None), ...]); even = airline
# ---------------------------------------------------------------------------

BASE_PLAN = [
    ("baggage", [("think_call", None), ("think_text", None)]),            # 0
    ("status", []),                                                        # 1
    ("info", [("consecutive_gpt", None)]),                                 # 2
    ("address", []),                                                       # 3
    ("cancel", [("trailing_human", None)]),                                # 4
    ("product_parallel", []),                                              # 5
    ("search", [("think_only", None)]),                                    # 6
    ("return", [("consecutive_gpt", None)]),                               # 7
    ("info", [("args_json_string", "get_reservation_details")]),           # 8
    ("status", [("trailing_human", None)]),                                # 9
    ("cancel", [("args_pydict", "get_reservation_details")]),              # 10
    ("return", [("think_call", None)]),                                    # 11
    ("info", [("args_broken", "get_reservation_details")]),                # 12
    ("product", [("think_only", None)]),                                   # 13
    ("info", [("unknown_tool", "get_reservation_details")]),               # 14
    ("address", [("think_text", None)]),                                   # 15
    ("book", [("think_call", None)]),                                      # 16
    ("status", [("args_json_string", "get_order_details")]),               # 17
    ("baggage", [("missing_required", "update_reservation_baggages")]),    # 18
    ("cancel", [("args_pydict", "get_order_details")]),                    # 19
    ("cancel", [("think_text", None)]),                                    # 20
    ("cancel", [("args_broken", "get_order_details")]),                    # 21
    ("info", [("extra_key", "get_reservation_details")]),                  # 22
    ("address", [("unknown_tool", "get_order_details")]),                  # 23
    ("baggage", [("wrong_type", "update_reservation_baggages")]),          # 24
    ("return", [("missing_required", "return_delivered_order_items")]),    # 25
    ("book", [("wrong_type", "book_reservation")]),                        # 26
    ("status", [("extra_key", "get_order_details")]),                      # 27
    ("info", [("tool_tag", None)]),                                        # 28
    ("return", [("missing_hash", "get_order_details")]),                   # 29
    ("search", [("list_leak", None)]),                                     # 30
    ("exchange", [("missing_hash", "exchange_delivered_order_items")]),    # 31
    ("info_parallel", []),                                                 # 32
    ("address", [("tool_tag", None)]),                                     # 33
    ("baggage", []),                                                       # 34
    ("exchange", [("list_leak", None)]),                                   # 35
]
N_BASE = len(BASE_PLAN)
VARIANTS = [0, 5, 10, 20]
RECOVERY_KINDS = ["res_not_found", "email_not_found", "user_not_found", "order_not_found"]

UNKNOWN_NAMES = {"get_reservation_details": "get_booking_details", "get_order_details": "lookup_order"}
EXTRA_KEYS = {"get_reservation_details": ("include_history", True), "get_order_details": ("include_tracking", True)}
MISSING_KEYS = {"update_reservation_baggages": "payment_id", "return_delivered_order_items": "payment_method_id"}
WRONG_TYPE_KEYS = {"update_reservation_baggages": "total_baggages", "book_reservation": "passengers"}

THINK_CALL = {
    "get_user_details": "The user wants to change a booking. I should load their profile first to check membership and payment methods.",
    "get_reservation_details": "I need the reservation details before I can say anything about it.",
    "search_direct_flight": "I should search direct flights for that route and date before offering anything.",
    "find_user_id_by_email": "The user gave an email, so I can authenticate them first by finding their user id.",
    "get_order_details": "Now I need the order details to see its status and items.",
    "get_product_details": "I should check which variants of this product are available.",
}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

class Conv:
    """Messages as ("human"|"gpt", text), ("call", name, args, think) or ("obs", result)."""

    def __init__(self, domain):
        self.domain = domain
        self.m = []

    def h(self, text):
        self.m.append(["human", text])

    def g(self, text):
        self.m.append(["gpt", text])

    def call(self, name, args):
        self.m.append(["call", name, args, None])

    def obs(self, result):
        self.m.append(["obs", result])


def money(x):
    return f"${x:,.2f}" if x != int(x) else f"${int(x):,}"


def digits(rng, n):
    return "".join(rng.choice("0123456789") for _ in range(n))


def person(rng):
    first, last = rng.choice(FIRST), rng.choice(LAST)
    return first, last


def address(rng):
    city, state = rng.choice(CITIES)
    return {"address1": f"{rng.randint(10, 9899)} {rng.choice(STREETS)}",
            "address2": rng.choice(["", f"Apt {rng.randint(1, 40)}", f"Suite {rng.randint(100, 899)}"]),
            "city": city, "country": "USA", "state": state, "zip": digits(rng, 5)}


def typo(rng, s, alphabet):
    """s with one character replaced (never the first one, never '#')."""
    i = rng.randint(1, len(s) - 1)
    while s[i] in "#_@.":
        i = rng.randint(1, len(s) - 1)
    c = rng.choice([a for a in alphabet if a != s[i]])
    return s[:i] + c + s[i + 1:]


ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def reservation_id(rng):
    while True:
        r = "".join(rng.choice(ALNUM) for _ in range(6))
        if any(c.isalpha() for c in r) and any(c.isdigit() for c in r):
            return r


FREE_BAGS = {"regular": {"basic_economy": 0, "economy": 1, "business": 2},
             "silver": {"basic_economy": 1, "economy": 2, "business": 3},
             "gold": {"basic_economy": 2, "economy": 3, "business": 3}}


class World:
    """Entities shared by one generator run (drawn from one rng, in order)."""

    def __init__(self, rng):
        self.rng = rng
        self.catalog = []
        for name, opts in PRODUCTS:
            pid = digits(rng, 10)
            variants = {}
            base = rng.uniform(15, 250)
            keys = list(opts)
            for _ in range(4):
                options = {k: rng.choice(opts[k]) for k in keys}
                if any(v["options"] == options for v in variants.values()):
                    continue
                iid = digits(rng, 10)
                variants[iid] = {"item_id": iid, "options": options,
                                 "available": rng.random() < 0.8,
                                 "price": round(base * rng.uniform(0.9, 1.15), 2)}
            self.catalog.append({"name": name, "product_id": pid, "variants": variants})

    # -- airline ----------------------------------------------------------
    def air_user(self):
        rng = self.rng
        first, last = person(rng)
        uid = f"{first.lower()}_{last.lower()}_{rng.randint(1000, 9999)}"
        cc = f"credit_card_{digits(rng, 7)}"
        pms = {cc: {"source": "credit_card", "brand": rng.choice(CARD_BRANDS),
                    "last_four": digits(rng, 4), "id": cc}}
        if rng.random() < 0.5:
            gc = f"gift_card_{digits(rng, 7)}"
            pms[gc] = {"source": "gift_card", "amount": rng.randint(20, 300), "id": gc}
        return {"user_id": uid, "name": {"first_name": first, "last_name": last},
                "email": f"{first.lower()}.{last.lower()}{rng.randint(10, 99)}@example.com",
                "membership": rng.choice(["regular", "silver", "gold"]),
                "payment_methods": pms, "reservations": []}

    def flight(self, origin, dest, date):
        rng = self.rng
        dep = rng.randint(6, 20)
        dur = rng.randint(2, 6)
        return {"flight_number": f"SKW{rng.randint(100, 999)}", "origin": origin, "destination": dest,
                "date": date, "scheduled_departure_time_est": f"{dep:02d}:{rng.choice(['00', '30'])}:00",
                "scheduled_arrival_time_est": f"{(dep + dur) % 24:02d}:{rng.choice(['00', '30'])}:00",
                "price": rng.randint(90, 600)}

    def reservation(self, user, cabin=None, created=None, insurance=None):
        rng = self.rng
        origin, dest = rng.sample(AIRPORTS, 2)
        ftype = rng.choice(["one_way", "round_trip"])
        cabin = cabin or rng.choice(["basic_economy", "economy", "business"])
        day = rng.randint(17, 24)
        flights = []
        f = self.flight(origin, dest, f"2024-05-{day:02d}")
        flights.append({k: f[k] for k in ("flight_number", "origin", "destination", "date", "price")})
        if ftype == "round_trip":
            f = self.flight(dest, origin, f"2024-05-{day + rng.randint(2, 6):02d}")
            flights.append({k: f[k] for k in ("flight_number", "origin", "destination", "date", "price")})
        if cabin == "business":
            for f in flights:
                f["price"] *= 3
        n = rng.randint(1, 3)
        pax = [{"first_name": user["name"]["first_name"], "last_name": user["name"]["last_name"],
                "dob": f"19{rng.randint(55, 99)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"}]
        for _ in range(n - 1):
            f2, l2 = person(rng)
            pax.append({"first_name": f2, "last_name": l2,
                        "dob": f"19{rng.randint(55, 99)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"})
        ins = insurance if insurance is not None else rng.choice(["yes", "no"])
        total = sum(f["price"] for f in flights) * n + (30 * n if ins == "yes" else 0)
        pay = next(iter(user["payment_methods"]))
        free = FREE_BAGS[user["membership"]][cabin] * n
        bags = rng.randint(0, free + 1)
        rid = reservation_id(rng)
        user["reservations"].append(rid)
        created = created or f"2024-05-{rng.randint(1, 12):02d}T{rng.randint(8, 22):02d}:{rng.randint(0, 59):02d}:00"
        return {"reservation_id": rid, "user_id": user["user_id"], "origin": origin, "destination": dest,
                "flight_type": ftype, "cabin": cabin, "flights": flights, "passengers": pax,
                "payment_history": [{"payment_id": pay, "amount": total}], "created_at": created,
                "total_baggages": bags, "nonfree_baggages": max(0, bags - free), "insurance": ins}

    # -- retail -----------------------------------------------------------
    def shop_user(self):
        rng = self.rng
        first, last = person(rng)
        uid = f"{first.lower()}_{last.lower()}_{rng.randint(1000, 9999)}"
        pm = rng.choice(["credit_card", "paypal"]) + "_" + digits(rng, 7)
        pms = {pm: {"source": pm.rsplit("_", 1)[0], "id": pm}}
        if pm.startswith("credit_card"):
            pms[pm].update({"brand": rng.choice(CARD_BRANDS), "last_four": digits(rng, 4)})
        if rng.random() < 0.5:
            gc = f"gift_card_{digits(rng, 7)}"
            pms[gc] = {"source": "gift_card", "balance": rng.randint(10, 150), "id": gc}
        return {"user_id": uid, "name": {"first_name": first, "last_name": last},
                "email": f"{first.lower()}.{last.lower()}{rng.randint(10, 99)}@example.com",
                "address": address(rng), "payment_methods": pms, "orders": []}

    def order(self, user, status, n_items=None):
        rng = self.rng
        n = n_items or rng.randint(1, 3)
        prods = rng.sample(self.catalog, n)
        items = []
        for p in prods:
            v = p["variants"][rng.choice(list(p["variants"]))]
            items.append({"name": p["name"], "product_id": p["product_id"], "item_id": v["item_id"],
                          "price": v["price"], "options": dict(v["options"])})
        oid = "#W" + digits(rng, 7)
        user["orders"].append(oid)
        pm = next(iter(user["payment_methods"]))
        total = round(sum(i["price"] for i in items), 2)
        o = {"order_id": oid, "user_id": user["user_id"], "address": dict(user["address"]),
             "items": items, "status": status, "fulfillments": [],
             "payment_history": [{"transaction_type": "payment", "amount": total, "payment_method_id": pm}]}
        if status in ("processed", "delivered"):
            o["fulfillments"] = [{"tracking_id": [digits(rng, 12)], "item_ids": [i["item_id"] for i in items]}]
        return o

    def product(self, pid):
        return next(p for p in self.catalog if p["product_id"] == pid)


def opts_text(options):
    return ", ".join(f"{k} {v}" for k, v in options.items())


def pick(rng, *xs):
    return rng.choice(xs)


# ---------------------------------------------------------------------------
# Airline scenarios
# ---------------------------------------------------------------------------

def closing(c, rng):
    c.h(pick(rng, "No, that's all. Thank you!", "That's everything, thanks.", "Great, thanks for your help!",
             "Perfect, that's all I needed."))
    c.g(pick(rng, "You're welcome! Have a great trip." if c.domain == "airline" else
             "You're welcome! Enjoy your purchase.", "Happy to help. Have a wonderful day!",
             "You're welcome. Take care!", "Glad I could help. Goodbye!"))


def sc_baggage(w, rng, ask_ids):
    user = w.air_user()
    res = w.reservation(user)
    rid, uid = res["reservation_id"], user["user_id"]
    k = rng.randint(1, 2)
    c = Conv("airline")
    if ask_ids:
        c.h(pick(rng, f"Hi, I need to add {k} checked bag{'s' if k > 1 else ''} to my trip.",
                 f"Hello! Can I add {k} more suitcase{'s' if k > 1 else ''} to my booking?"))
        c.g("Of course. Could you give me your user id and the reservation id?")
        c.h(f"My user id is {uid} and the reservation is {rid}.")
    else:
        c.h(f"Hi, I'm {user['name']['first_name']} ({uid}). I'd like to add {k} checked "
            f"bag{'s' if k > 1 else ''} to reservation {rid}.")
    c.call("get_user_details", {"user_id": uid})
    c.obs(user)
    c.call("get_reservation_details", {"reservation_id": rid})
    c.obs(res)
    n = len(res["passengers"])
    free = FREE_BAGS[user["membership"]][res["cabin"]] * n
    total = res["total_baggages"] + k
    nonfree = max(0, total - free)
    cost = 50 * (nonfree - res["nonfree_baggages"])
    pay = next(iter(user["payment_methods"]))
    last4 = user["payment_methods"][pay]["last_four"]
    charge = (f"That is {nonfree - res['nonfree_baggages']} extra paid bag(s) at $50 each, {money(cost)} in total, "
              f"charged to your card ending in {last4}." if cost else
              "They are all within your free allowance, so there is no charge.")
    c.g(f"Your reservation {rid} ({res['origin']} to {res['destination']}, {res['cabin'].replace('_', ' ')}, "
        f"{n} passenger{'s' if n > 1 else ''}) has {res['total_baggages']} checked bag(s). As a "
        f"{user['membership']} member you get {free} free bag(s) on this booking. Adding {k} makes {total}. "
        f"{charge} Shall I go ahead?")
    c.h(pick(rng, "Yes, please.", "Yes, go ahead.", "Sounds good, do it."))
    c.call("update_reservation_baggages", {"reservation_id": rid, "total_baggages": total,
                                           "nonfree_baggages": nonfree, "payment_id": pay})
    new = dict(res, total_baggages=total, nonfree_baggages=nonfree)
    if cost:
        new["payment_history"] = res["payment_history"] + [{"payment_id": pay, "amount": cost}]
    c.obs(new)
    c.g(f"Done! Reservation {rid} now has {total} checked bags ({nonfree} paid).")
    if not ask_ids:
        closing(c, rng)
    return c


def sc_cancel(w, rng, close=True):
    user = w.air_user()
    case = rng.choice(["recent", "business", "insurance"])
    if case == "recent":
        res = w.reservation(user, created="2024-05-15T09:" + f"{rng.randint(10, 59)}:00")
        why, reason_txt = "it was booked less than 24 hours ago", pick(rng, "My plans changed.", "I booked the wrong dates.")
    elif case == "business":
        res = w.reservation(user, cabin="business")
        why, reason_txt = "it is a business class booking", pick(rng, "My meeting got moved.", "I no longer need to travel.")
    else:
        res = w.reservation(user, insurance="yes")
        why, reason_txt = "it has travel insurance and the reason is health-related", \
            pick(rng, "I'm sick and my doctor told me not to fly.", "I have a medical emergency in the family.")
    rid, uid = res["reservation_id"], user["user_id"]
    c = Conv("airline")
    c.h(pick(rng, f"I need to cancel my reservation {rid}. My user id is {uid}.",
             f"Hi, please cancel booking {rid}, user {uid}."))
    c.call("get_reservation_details", {"reservation_id": rid})
    c.obs(res)
    paid = res["payment_history"][0]["amount"]
    fl = res["flights"][0]
    c.g(f"I found reservation {rid}: {res['origin']} to {res['destination']} on {fl['date']} "
        f"({fl['flight_number']}), {res['cabin'].replace('_', ' ')}. May I ask why you want to cancel?")
    c.h(reason_txt)
    c.g(f"Thanks. This reservation qualifies for a full refund of {money(paid)} because {why}. "
        f"Do you confirm the cancellation?")
    c.h(pick(rng, "Yes, cancel it.", "Yes please.", "Confirmed."))
    c.call("cancel_reservation", {"reservation_id": rid})
    new = dict(res, status="cancelled",
               payment_history=res["payment_history"] + [{"payment_id": res["payment_history"][0]["payment_id"],
                                                          "amount": -paid}])
    c.obs(new)
    c.g(f"Reservation {rid} is cancelled. The refund of {money(paid)} goes back to the original payment "
        f"method within 5-7 business days.")
    if close:
        closing(c, rng)
    return c


def sc_search(w, rng, follow_up):
    o, d = rng.sample(AIRPORTS, 2)
    day = rng.randint(17, 28)
    c = Conv("airline")

    def one(date):
        fs = [w.flight(o, d, date) for _ in range(rng.randint(1, 3))]
        out = []
        for f in fs:
            out.append({"flight_number": f["flight_number"], "origin": o, "destination": d,
                        "scheduled_departure_time_est": f["scheduled_departure_time_est"],
                        "scheduled_arrival_time_est": f["scheduled_arrival_time_est"], "status": "available",
                        "available_seats": {"basic_economy": rng.randint(0, 9), "economy": rng.randint(0, 15),
                                            "business": rng.randint(0, 6)},
                        "prices": {"basic_economy": f["price"] - 40, "economy": f["price"],
                                   "business": f["price"] * 3}})
        c.call("search_direct_flight", {"origin": o, "destination": d, "date": date})
        c.obs(out)
        lines = [f"{x['flight_number']} departs {x['scheduled_departure_time_est'][:5]} and arrives "
                 f"{x['scheduled_arrival_time_est'][:5]}, economy {money(x['prices']['economy'])} "
                 f"({x['available_seats']['economy']} seats left)" for x in out]
        return "; ".join(lines)

    date = f"2024-05-{day:02d}"
    c.h(pick(rng, f"Are there any direct flights from {o} to {d} on {date}?",
             f"Hi, could you check nonstop flights {o} to {d} for {date}?"))
    c.g(f"Here are the direct flights from {o} to {d} on {date}: {one(date)}.")
    if follow_up:
        date2 = f"2024-05-{day + 1:02d}"
        c.h(f"And what about the next day, {date2}?")
        c.g(f"On {date2}: {one(date2)}.")
    closing(c, rng)
    # move each call ahead of the gpt text that reports it (the text was built after the search)
    m = c.m
    out = [m[0]]
    i = 1
    while i < len(m):
        if m[i][0] == "gpt" and i + 2 < len(m) and m[i + 1][0] == "call":
            out += [m[i + 1], m[i + 2], m[i]]
            i += 3
        else:
            out.append(m[i])
            i += 1
    c.m = out
    return c


def sc_book(w, rng):
    user = w.air_user()
    uid = user["user_id"]
    o, d = rng.sample(AIRPORTS, 2)
    date = f"2024-05-{rng.randint(18, 29):02d}"
    n = rng.randint(1, 2)
    c = Conv("airline")
    c.h(f"Hi, I'd like to book a one-way flight from {o} to {d} on {date} for {n} "
        f"passenger{'s' if n > 1 else ''}. My user id is {uid}.")
    c.call("get_user_details", {"user_id": uid})
    c.obs(user)
    fs = [w.flight(o, d, date) for _ in range(2)]
    res = [{"flight_number": f["flight_number"], "origin": o, "destination": d,
            "scheduled_departure_time_est": f["scheduled_departure_time_est"],
            "scheduled_arrival_time_est": f["scheduled_arrival_time_est"], "status": "available",
            "available_seats": {"basic_economy": rng.randint(2, 9), "economy": rng.randint(2, 15),
                                "business": rng.randint(2, 6)},
            "prices": {"basic_economy": f["price"] - 40, "economy": f["price"], "business": f["price"] * 3}}
           for f in fs]
    c.call("search_direct_flight", {"origin": o, "destination": d, "date": date})
    c.obs(res)
    c.g(f"I found two direct flights: {res[0]['flight_number']} at {res[0]['scheduled_departure_time_est'][:5]} "
        f"(economy {money(res[0]['prices']['economy'])}, business {money(res[0]['prices']['business'])}) and "
        f"{res[1]['flight_number']} at {res[1]['scheduled_departure_time_est'][:5]} (economy "
        f"{money(res[1]['prices']['economy'])}, business {money(res[1]['prices']['business'])}), per passenger. "
        f"Which flight and cabin would you like, and do you want travel insurance ($30 per passenger)?")
    pickf = rng.choice(res)
    cabin = rng.choice(["economy", "business"])
    ins = rng.random() < 0.5
    total = pickf["prices"][cabin] * n + (30 * n if ins else 0)
    pay = next(iter(user["payment_methods"]))
    c.h(f"{pickf['flight_number']} in {cabin}, {'with' if ins else 'without'} insurance. That's {money(total)} "
        f"in total, right? Please book it with my card on file.")
    args = {"user_id": uid, "origin": o, "destination": d, "flight_type": "one_way", "cabin": cabin,
            "flight_numbers": [pickf["flight_number"]], "passengers": n, "insurance": ins,
            "total_price": total, "payment": {"payment_id": pay, "amount": total}}
    c.call("book_reservation", args)
    rid = reservation_id(rng)
    c.obs({"reservation_id": rid, "user_id": uid, "origin": o, "destination": d, "flight_type": "one_way",
           "cabin": cabin, "flights": [{"flight_number": pickf["flight_number"], "origin": o, "destination": d,
                                        "date": date, "price": pickf["prices"][cabin]}],
           "passengers": n, "payment_history": [{"payment_id": pay, "amount": total}],
           "created_at": "2024-05-15T15:00:00", "total_baggages": 0, "nonfree_baggages": 0,
           "insurance": "yes" if ins else "no"})
    c.g(f"You're booked! Your reservation id is {rid}: {pickf['flight_number']} {o} to {d} on {date}, "
        f"{cabin}, {money(total)} charged to {pay}.")
    closing(c, rng)
    return c


def res_summary(res):
    fl = res["flights"]
    legs = " and ".join(f"{f['flight_number']} {f['origin']}-{f['destination']} on {f['date']}" for f in fl)
    return (f"Reservation {res['reservation_id']} is a {res['flight_type'].replace('_', '-')} "
            f"{res['cabin'].replace('_', ' ')} booking for {len(res['passengers'])} passenger(s): {legs}.")


def sc_info(w, rng):
    user = w.air_user()
    res = w.reservation(user)
    rid, uid = res["reservation_id"], user["user_id"]
    c = Conv("airline")
    c.h(pick(rng, f"Hi, can you tell me the details of my reservation {rid}? I'm {uid}.",
             f"Hello, I'm user {uid}. What flights are on reservation {rid}?"))
    c.call("get_reservation_details", {"reservation_id": rid})
    c.obs(res)
    c.g(res_summary(res) + " Is there anything specific you'd like to know?")
    q = rng.choice(["bags", "insurance"])
    if q == "bags":
        c.h("How many checked bags do I have on it?")
        c.g(f"You have {res['total_baggages']} checked bag(s), {res['nonfree_baggages']} of them paid.")
    else:
        c.h("Did I buy travel insurance for this one?")
        c.g("Yes, this reservation includes travel insurance." if res["insurance"] == "yes"
            else "No, this reservation has no travel insurance, and it can only be added at booking time.")
    closing(c, rng)
    return c


def sc_info_parallel(w, rng):
    user = w.air_user()
    r1, r2 = w.reservation(user), w.reservation(user)
    uid = user["user_id"]
    c = Conv("airline")
    c.h(f"Hi, I'm {uid}. I have two reservations, {r1['reservation_id']} and {r2['reservation_id']}. "
        f"Which one is the flight to {r2['destination']}?")
    c.call("get_reservation_details", {"reservation_id": r1["reservation_id"]})
    c.call("get_reservation_details", {"reservation_id": r2["reservation_id"]})
    c.obs(r1)
    c.obs(r2)
    c.g(f"{r2['reservation_id']} is the one to {r2['destination']} (departing {r2['flights'][0]['date']}); "
        f"{r1['reservation_id']} goes from {r1['origin']} to {r1['destination']}.")
    closing(c, rng)
    return c


# ---------------------------------------------------------------------------
# Retail scenarios
# ---------------------------------------------------------------------------

def retail_auth(c, user):
    c.call("find_user_id_by_email", {"email": user["email"]})
    c.obs(user["user_id"])


def sc_status(w, rng):
    user = w.shop_user()
    o = w.order(user, rng.choice(["pending", "processed", "delivered"]))
    c = Conv("retail")
    c.h(pick(rng, f"Hi, where is my order {o['order_id']}? My email is {user['email']}.",
             f"Hello, could you check the status of order {o['order_id']}? Email: {user['email']}"))
    retail_auth(c, user)
    c.call("get_order_details", {"order_id": o["order_id"]})
    c.obs(o)
    names = ", ".join(i["name"] for i in o["items"])
    if o["status"] == "pending":
        st = "is pending: it has not been processed yet, so it can still be changed or cancelled"
    elif o["status"] == "processed":
        st = f"has been processed and is on its way (tracking number {o['fulfillments'][0]['tracking_id'][0]})"
    else:
        st = f"was delivered (tracking number {o['fulfillments'][0]['tracking_id'][0]})"
    c.g(f"Thanks, I've verified your account. Order {o['order_id']} ({names}) {st}.")
    closing(c, rng)
    return c


def sc_address(w, rng):
    user = w.shop_user()
    o = w.order(user, "pending")
    a = address(rng)
    c = Conv("retail")
    c.h(f"Hi, I moved and need to change the shipping address on order {o['order_id']}. My email is {user['email']}.")
    retail_auth(c, user)
    c.call("get_order_details", {"order_id": o["order_id"]})
    c.obs(o)
    line = f"{a['address1']}{', ' + a['address2'] if a['address2'] else ''}, {a['city']}, {a['state']} {a['zip']}"
    c.g(f"Order {o['order_id']} is still pending, so the address can be changed. It currently ships to "
        f"{o['address']['address1']}, {o['address']['city']}. What is the new address?")
    c.h(f"It's {line}.")
    c.g(f"To confirm: change the shipping address of {o['order_id']} to {line}. Shall I proceed?")
    c.h("Yes.")
    c.call("modify_pending_order_address", {"order_id": o["order_id"], "address1": a["address1"],
                                            "address2": a["address2"], "city": a["city"], "state": a["state"],
                                            "zip": a["zip"]})
    c.obs(dict(o, address=a))
    c.g(f"Done. Order {o['order_id']} will now ship to {line}.")
    return c


def sc_return(w, rng, close=False):
    user = w.shop_user()
    o = w.order(user, "delivered", n_items=rng.randint(1, 3))
    it = rng.choice(o["items"])
    pm = o["payment_history"][0]["payment_method_id"]
    c = Conv("retail")
    c.h(pick(rng, f"Hello, I'd like to return the {it['name'].lower()} from order {o['order_id']}. "
                  f"My email is {user['email']}.",
             f"Hi! Email {user['email']}. The {it['name'].lower()} in {o['order_id']} isn't what I "
             f"expected, can I send it back?"))
    retail_auth(c, user)
    c.call("get_order_details", {"order_id": o["order_id"]})
    c.obs(o)
    c.g(f"Order {o['order_id']} was delivered, so the {it['name']} ({opts_text(it['options'])}, "
        f"item {it['item_id']}) can be returned. The refund of {money(it['price'])} goes to the original "
        f"payment method, {pm}. Would you like me to proceed?")
    c.h(pick(rng, "Yes, please.", "Yes, go ahead.", "Yes, refund it to the original payment."))
    c.call("return_delivered_order_items", {"order_id": o["order_id"], "item_ids": [it["item_id"]],
                                            "payment_method_id": pm})
    c.obs(dict(o, status="return requested", return_items=[it["item_id"]], return_payment_method_id=pm))
    c.g(f"Your return is requested. You'll receive an email with the return label, and {money(it['price'])} "
        f"will be refunded to {pm} once the item arrives.")
    if close:
        closing(c, rng)
    return c


def sc_exchange(w, rng):
    user = w.shop_user()
    while True:
        o = w.order(user, "delivered", n_items=rng.randint(1, 2))
        choices = []
        for it in o["items"]:
            p = w.product(it["product_id"])
            alts = [v for v in p["variants"].values() if v["item_id"] != it["item_id"] and v["available"]]
            if alts:
                choices.append((it, p, alts))
        if choices:
            break
        user["orders"].pop()
    it, p, alts = rng.choice(choices)
    nv = rng.choice(alts)
    pm = o["payment_history"][0]["payment_method_id"]
    diff = round(nv["price"] - it["price"], 2)
    c = Conv("retail")
    c.h(f"Hi, I'd like to exchange the {it['name'].lower()} in order {o['order_id']} for "
        f"{opts_text(nv['options'])}. My email is {user['email']}.")
    retail_auth(c, user)
    c.call("get_order_details", {"order_id": o["order_id"]})
    c.obs(o)
    c.call("get_product_details", {"product_id": p["product_id"]})
    c.obs(p)
    diff_txt = (f"costs {money(diff)} more, charged to {pm}" if diff > 0 else
                f"is {money(-diff)} cheaper, refunded to {pm}" if diff < 0 else "costs the same")
    c.g(f"The {it['name']} with {opts_text(nv['options'])} (item {nv['item_id']}) is available. It {diff_txt}. "
        f"Shall I exchange item {it['item_id']} for it?")
    c.h("Yes, let's do that.")
    c.call("exchange_delivered_order_items", {"order_id": o["order_id"], "item_ids": [it["item_id"]],
                                              "new_item_ids": [nv["item_id"]], "payment_method_id": pm})
    c.obs(dict(o, status="exchange requested", exchange_items=[it["item_id"]],
               exchange_new_items=[nv["item_id"]], exchange_payment_method_id=pm,
               exchange_price_difference=diff))
    c.g(f"The exchange is requested. Please send back the old {it['name'].lower()} with the label we email "
        f"you; the new one ships once it arrives.")
    return c


def sc_retail_cancel(w, rng):
    user = w.shop_user()
    o = w.order(user, "pending")
    reason = rng.choice(["no longer needed", "ordered by mistake"])
    c = Conv("retail")
    c.h(pick(rng, f"I want to cancel order {o['order_id']}, my email is {user['email']}.",
             f"Hi, please cancel my order {o['order_id']}. Email {user['email']}."))
    retail_auth(c, user)
    c.call("get_order_details", {"order_id": o["order_id"]})
    c.obs(o)
    total = o["payment_history"][0]["amount"]
    c.g(f"Order {o['order_id']} is pending ({len(o['items'])} item(s), {money(total)}), so it can be "
        f"cancelled. Is the reason 'no longer needed' or 'ordered by mistake'?")
    c.h(f"{reason.capitalize()}. Please go ahead.")
    c.call("cancel_pending_order", {"order_id": o["order_id"], "reason": reason})
    c.obs(dict(o, status="cancelled", cancel_reason=reason,
               payment_history=o["payment_history"] + [{"transaction_type": "refund", "amount": total,
                                                        "payment_method_id": o["payment_history"][0]["payment_method_id"]}]))
    c.g(f"Order {o['order_id']} is cancelled and {money(total)} will be refunded to your original payment method.")
    closing(c, rng)
    return c


def product_answer(p):
    av = [v for v in p["variants"].values() if v["available"]]
    if not av:
        return f"the {p['name']} is currently out of stock in every variant"
    return f"the {p['name']} is available as " + "; ".join(
        f"{opts_text(v['options'])} at {money(v['price'])}" for v in av)


def sc_product(w, rng):
    p = rng.choice(w.catalog)
    c = Conv("retail")
    c.h(f"Hi, which variants of the {p['name'].lower()} (product {p['product_id']}) do you have in stock?")
    c.call("get_product_details", {"product_id": p["product_id"]})
    c.obs(p)
    ans = product_answer(p)
    c.g(ans[0].upper() + ans[1:] + ".")
    closing(c, rng)
    return c


def sc_product_parallel(w, rng):
    p1, p2 = rng.sample(w.catalog, 2)
    c = Conv("retail")
    c.h(f"Hi, I'm choosing gifts. What variants of the {p1['name'].lower()} ({p1['product_id']}) and the "
        f"{p2['name'].lower()} ({p2['product_id']}) are available?")
    c.call("get_product_details", {"product_id": p1["product_id"]})
    c.call("get_product_details", {"product_id": p2["product_id"]})
    c.obs(p1)
    c.obs(p2)
    a1, a2 = product_answer(p1), product_answer(p2)
    c.g(a1[0].upper() + a1[1:] + ". And " + a2 + ".")
    closing(c, rng)
    return c


def build_base_one(w, rng, domain, scenario, edges):
    kinds = [e for e, _ in edges]
    if scenario == "baggage":
        # the long form (ids asked for) has no closing; edge conversations use the short one
        return sc_baggage(w, rng, ask_ids=not edges and rng.random() < 0.5)
    if scenario == "cancel":
        if domain == "retail":
            return sc_retail_cancel(w, rng)
        return sc_cancel(w, rng, close=True)
    if scenario == "search":
        return sc_search(w, rng, follow_up=("list_leak" in kinds))
    if scenario == "book":
        return sc_book(w, rng)
    if scenario == "info":
        return sc_info(w, rng)
    if scenario == "info_parallel":
        return sc_info_parallel(w, rng)
    if scenario == "status":
        return sc_status(w, rng)
    if scenario == "address":
        return sc_address(w, rng)
    if scenario == "return":
        return sc_return(w, rng, close="trailing_human" in kinds)
    if scenario == "exchange":
        return sc_exchange(w, rng)
    if scenario == "product":
        return sc_product(w, rng)
    if scenario == "product_parallel":
        return sc_product_parallel(w, rng)
    raise ValueError(scenario)


# ---------------------------------------------------------------------------
# Edge-case mutations (on the structured messages)
# ---------------------------------------------------------------------------

def find_call(c, name):
    for msg in c.m:
        if msg[0] == "call" and msg[1] == name:
            return msg
    raise ValueError(f"no call to {name}")


def apply_edge(c, rng, kind, target):
    m = c.m
    if kind == "consecutive_gpt":
        # after the last gpt turn that reports a tool result
        i = max(i for i in range(1, len(m)) if m[i][0] == "gpt" and m[i - 1][0] == "obs")
        m.insert(i + 1, ["gpt", pick(rng, "Is there anything else I can help you with today?",
                                     "Let me know if there is anything else you need.")])
    elif kind == "trailing_human":
        if m[-1][0] == "gpt" and m[-2][0] == "human":
            m.pop()
            m[-1][1] = pick(rng, "Thanks, bye!", "Great, thank you. Bye!")
        else:
            m.append(["human", "Thanks, bye!"])
    elif kind == "think_call":
        msg = next(x for x in m if x[0] == "call")
        msg[3] = f"<think>{THINK_CALL[msg[1]]}</think>"
    elif kind == "think_only":
        i = next(i for i in range(1, len(m)) if m[i][0] == "call" and m[i - 1][0] == "human")
        m.insert(i, ["gpt", "<think>Before answering I should look this up with a tool rather than guess.</think>"])
    elif kind == "think_text":
        i = next(i for i in range(1, len(m)) if m[i][0] == "gpt" and m[i - 1][0] == "obs")
        m[i][1] = ("<think>The tool result matches what the user described. I should summarize it and get an "
                   "explicit confirmation before changing anything.</think>\n" + m[i][1])
    elif kind == "args_json_string":
        msg = find_call(c, target)
        msg[2] = json.dumps(msg[2], ensure_ascii=False)
    elif kind == "args_pydict":
        msg = find_call(c, target)
        msg[2] = repr(msg[2])
    elif kind == "args_broken":
        msg = find_call(c, target)
        msg[2] = "&".join(f"{k}={v}" for k, v in msg[2].items())
    elif kind == "unknown_tool":
        find_call(c, target)[1] = UNKNOWN_NAMES[target]
    elif kind == "missing_required":
        del find_call(c, target)[2][MISSING_KEYS[target]]
    elif kind == "extra_key":
        k, v = EXTRA_KEYS[target]
        find_call(c, target)[2][k] = v
    elif kind == "wrong_type":
        args = find_call(c, target)[2]
        args[WRONG_TYPE_KEYS[target]] = str(args[WRONG_TYPE_KEYS[target]])
    elif kind == "missing_hash":
        args = find_call(c, target)[2]
        args["order_id"] = args["order_id"].lstrip("#")
    elif kind == "tool_tag":
        # a tool call leaked into the text, in a chat-template markup
        i = next(i for i in range(1, len(m)) if m[i][0] == "gpt" and m[i - 1][0] == "obs")
        first = next(x[1] for x in m if x[0] == "obs" and isinstance(x[1], dict))
        if c.domain == "airline":
            leaked = {"name": "get_user_details", "arguments": {"user_id": first["user_id"]}}
        else:
            leaked = {"name": "get_order_details", "arguments": {"order_id": first["order_id"]}}
        m[i][1] = m[i][1] + "\n<tool_call>\n" + json.dumps(leaked, ensure_ascii=False) + "\n</tool_call>"
    elif kind == "list_leak":
        i = next(i for i in range(1, len(m)) if m[i][0] == "gpt" and m[i - 1][0] == "obs")
        call_prev = next(x for x in reversed(m[:i]) if x[0] == "call")
        payload = json.dumps([{"name": call_prev[1], "arguments": call_prev[2]}], ensure_ascii=False)
        m[i][1] = "Let me check that again.\n" + payload + "\n" + m[i][1]
    else:
        raise ValueError(kind)


def serialize(c):
    out = []
    for msg in c.m:
        if msg[0] in ("human", "gpt"):
            out.append({"from": msg[0], "value": msg[1]})
        elif msg[0] == "call":
            v = json.dumps({"name": msg[1], "arguments": msg[2]}, ensure_ascii=False)
            if msg[3]:
                v = msg[3] + "\n" + v
            out.append({"from": "function_call", "value": v})
        else:
            r = msg[1]
            out.append({"from": "observation", "value": r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)})
    return {"conversations": out, "system": SYSTEM_SHORT[c.domain], "tools": TOOLS_JSON[c.domain]}


# ---------------------------------------------------------------------------
# Recovery conversations (extras)
# ---------------------------------------------------------------------------

def rec_res_not_found(w, rng):
    user = w.air_user()
    res = w.reservation(user)
    rid, uid = res["reservation_id"], user["user_id"]
    bad = typo(rng, rid, ALNUM)
    c = Conv("airline")
    c.h(f"Hi, I'm {uid}. Can you check reservation {bad} for me?")
    c.call("get_reservation_details", {"reservation_id": bad})
    c.obs({"error": "Reservation not found"})
    c.g(f"I couldn't find a reservation with the id {bad}. Could you double-check it?")
    c.h(f"Oh sorry, it's {rid}.")
    c.call("get_reservation_details", {"reservation_id": rid})
    c.obs(res)
    c.g("Thanks, found it. " + res_summary(res))
    closing(c, rng)
    return c


def rec_user_not_found(w, rng):
    user = w.air_user()
    res = w.reservation(user)
    uid = user["user_id"]
    bad = typo(rng, uid, "abcdefghijklmnopqrstuvwxyz0123456789")
    c = Conv("airline")
    c.h(f"Hello, my user id is {bad}. Which payment methods do I have saved?")
    c.call("get_user_details", {"user_id": bad})
    c.obs({"error": "User not found"})
    c.g(f"I couldn't find a user with the id {bad}. Could you check it and send it again?")
    c.h(f"My mistake, it's {uid}.")
    c.call("get_user_details", {"user_id": uid})
    c.obs(user)
    pms = []
    for p in user["payment_methods"].values():
        pms.append(f"a {p['brand']} card ending in {p['last_four']}" if p["source"] == "credit_card"
                   else f"a gift card with {money(p['amount'])}")
    c.g(f"Thanks, {user['name']['first_name']}. You have " + " and ".join(pms) +
        f" saved, and one reservation ({res['reservation_id']}).")
    closing(c, rng)
    return c


def rec_email_not_found(w, rng):
    user = w.shop_user()
    o = w.order(user, rng.choice(["pending", "delivered"]))
    local, dom = user["email"].split("@")
    bad = typo(rng, local, "abcdefghijklmnopqrstuvwxyz") + "@" + dom
    c = Conv("retail")
    c.h(f"Hi, can you tell me the status of order {o['order_id']}? My email is {bad}.")
    c.call("find_user_id_by_email", {"email": bad})
    c.obs({"error": "User not found"})
    c.g(f"I couldn't find an account with the email {bad}. Could you double-check it?")
    c.h(f"Sorry, typo. It's {user['email']}.")
    retail_auth(c, user)
    c.call("get_order_details", {"order_id": o["order_id"]})
    c.obs(o)
    c.g(f"Thanks, you're verified. Order {o['order_id']} is {o['status']}.")
    closing(c, rng)
    return c


def rec_order_not_found(w, rng):
    user = w.shop_user()
    o = w.order(user, "pending")
    bad = typo(rng, o["order_id"], "0123456789")
    c = Conv("retail")
    c.h(f"Hello, I'd like to know what's in my order {bad}. Email {user['email']}.")
    retail_auth(c, user)
    c.call("get_order_details", {"order_id": bad})
    c.obs({"error": "Order not found"})
    c.g(f"I couldn't find an order {bad}. Could you double-check the order number?")
    c.h(f"Ah, it's {o['order_id']}.")
    c.call("get_order_details", {"order_id": o["order_id"]})
    c.obs(o)
    c.g(f"Order {o['order_id']} is pending and contains: " +
        "; ".join(f"{i['name']} ({opts_text(i['options'])})" for i in o["items"]) + ".")
    closing(c, rng)
    return c


RECOVERY = {"res_not_found": rec_res_not_found, "user_not_found": rec_user_not_found,
            "email_not_found": rec_email_not_found, "order_not_found": rec_order_not_found}


# ---------------------------------------------------------------------------
# Edge-case detection (independent of the mutations; used for --stats and checks)
# ---------------------------------------------------------------------------

THINK_RE = re.compile(r"^<think>(.*?)</think>\n?", re.DOTALL)
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
              "array": list, "object": dict}


def type_ok(v, t):
    if t in ("integer", "number") and isinstance(v, bool):
        return False
    return isinstance(v, JSON_TYPES[t])


def detect(conv, domain):
    found = []
    msgs = conv["conversations"]
    roles = [x["from"] for x in msgs]
    schemas = {t["name"]: t["parameters"] for t in TOOLS[domain]}
    if any(a == b == "gpt" for a, b in zip(roles, roles[1:])):
        found.append("consecutive_gpt")
    if roles[-1] == "human":
        found.append("trailing_human")
    if any(a == b == "function_call" for a, b in zip(roles, roles[1:])):
        found.append("parallel")
    for x in msgs:
        v = x["value"]
        if "<tool_" in v:
            found.append("tool_tag")
        if "\n[{" in v:
            found.append("list_leak")
        if x["from"] == "gpt" and v.startswith("<think>"):
            rest = THINK_RE.sub("", v, count=1)
            found.append("think_text" if rest.strip() else "think_only")
        if x["from"] == "observation":
            try:
                if isinstance(json.loads(v), dict):
                    found.append("obs_object")
            except ValueError:
                pass
        if x["from"] != "function_call":
            continue
        if v.startswith("<think>"):
            found.append("think_call")
            v = THINK_RE.sub("", v, count=1)
        elif v.startswith("{"):
            found.append("plain_call")
        call = json.loads(v)
        args = call["arguments"]
        if isinstance(args, str):
            try:
                args = json.loads(args)
                found.append("args_json_string")
            except ValueError:
                found.append("args_pydict" if args.startswith("{'") else "args_broken")
                continue
        if call["name"] not in schemas:
            found.append("unknown_tool")
            continue
        sch = schemas[call["name"]]
        if any(k not in args for k in sch["required"]):
            found.append("missing_required")
        if any(k not in sch["properties"] for k in args):
            found.append("extra_key")
        if any(k in sch["properties"] and not type_ok(val, sch["properties"][k]["type"]) for k, val in args.items()):
            found.append("wrong_type")
        if "order_id" in args and isinstance(args["order_id"], str) and not args["order_id"].startswith("#"):
            found.append("missing_hash")
    return sorted(set(found))


def sharegpt_ok(conv):
    roles = [x["from"] for x in conv["conversations"]]
    ok = [("human", "observation"), ("gpt", "function_call")]
    return len(roles) % 2 == 0 and all(r in ok[i % 2] for i, r in enumerate(roles))


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def generate(seed):
    rng = random.Random(seed)
    w = World(rng)
    base = []
    for i, (scenario, edges) in enumerate(BASE_PLAN):
        domain = "airline" if i % 2 == 0 else "retail"
        c = build_base_one(w, rng, domain, scenario, edges)
        assert c.domain == domain, (i, scenario)
        for kind, target in edges:
            apply_edge(c, rng, kind, target)
        base.append(serialize(c))
    # the extras have their own rng and world: the base does not depend on them, and
    # variant k's extras are the first round(36*k/100) of the same list
    rrng = random.Random(seed * 1000 + 1)
    wx = World(rrng)
    extras = []
    for r in range(max(round(N_BASE * v / 100) for v in VARIANTS)):
        kind = RECOVERY_KINDS[r % len(RECOVERY_KINDS)]
        extras.append(serialize(RECOVERY[kind](wx, rrng)))
    # a held-out set for evaluation, in no variant: clean dialogues of every
    # scenario (both domains) and two recoveries, from a world of its own
    hrng = random.Random(seed * 1000 + 2)
    wh = World(hrng)
    heldout = []
    for i, scenario in enumerate(HELDOUT_SCENARIOS):
        domain = "airline" if i % 2 == 0 else "retail"
        c = build_base_one(wh, hrng, domain, scenario, [])
        assert c.domain == domain, (i, scenario)
        heldout.append(serialize(c))
    for kind in RECOVERY_KINDS[:2]:
        heldout.append(serialize(RECOVERY[kind](wh, hrng)))
    return base, extras, heldout


# (airline, retail) alternating; every scenario the base uses
HELDOUT_SCENARIOS = [
    "baggage", "status", "cancel", "address", "search", "return",
    "book", "exchange", "info", "product", "info_parallel", "cancel",
]


EXPECTED = {
    "consecutive_gpt": [2, 7], "trailing_human": [4, 9], "think_call": [0, 11, 16],
    "think_only": [6, 13], "think_text": [0, 15, 20], "args_json_string": [8, 17],
    "args_pydict": [10, 19], "args_broken": [12, 21], "unknown_tool": [14, 23],
    "missing_required": [18, 25], "extra_key": [22, 27], "wrong_type": [24, 26],
    "missing_hash": [29, 31], "tool_tag": [28, 33], "list_leak": [30, 35], "parallel": [5, 32],
}


def dump(obj, path):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1, sort_keys=False)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description="Generate synthetic tau-bench-style ShareGPT tool-calling dialogues.")
    ap.add_argument("--out", required=True, help="output directory (e.g. pipelines/data/tau2)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--stats", action="store_true", help="print the edge-case index table to stderr")
    args = ap.parse_args()

    base, extras, heldout = generate(args.seed)
    domains = ["airline" if i % 2 == 0 else "retail" for i in range(len(base))]
    table = {}
    for i, (conv, d) in enumerate(zip(base, domains)):
        n = len(conv["conversations"])
        assert 4 <= n <= 12, (i, n)
        for e in detect(conv, d):
            table.setdefault(e, []).append(i)
    for e, idx in EXPECTED.items():
        assert table.get(e) == idx, (e, table.get(e), idx)
    for i, (conv, d) in enumerate(zip(base, domains)):
        want = {k for k, _ in BASE_PLAN[i][1]} | ({"parallel"} if "parallel" in BASE_PLAN[i][0] else set())
        assert set(detect(conv, d)) - {"plain_call", "obs_object"} == want, (i, detect(conv, d), want)
    for j, conv in enumerate(extras):
        d = "airline" if j % 2 == 0 else "retail"
        assert sharegpt_ok(conv), j
        assert not set(detect(conv, d)) - {"plain_call", "obs_object"}, (j, detect(conv, d))
        assert any("error" in x["value"] for x in conv["conversations"] if x["from"] == "observation")
    assert domains.count("airline") == domains.count("retail") == N_BASE // 2
    for j, conv in enumerate(heldout):
        d = "airline" if j % 2 == 0 else "retail"
        assert not set(detect(conv, d)) - {"plain_call", "obs_object", "parallel"}, ("heldout", j)

    os.makedirs(os.path.join(args.out, "system_prompts"), exist_ok=True)
    dump(TOOLS, os.path.join(args.out, "tool_schemas.json"))
    for d, text in SYSTEM_FULL.items():
        with open(os.path.join(args.out, "system_prompts", f"{d}.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    for v in VARIANTS:
        k = round(N_BASE * v / 100)
        dump(base + extras[:k], os.path.join(args.out, f"variant_{v}.json"))
    dump(heldout, os.path.join(args.out, "heldout.json"))

    if args.stats:
        print(f"base: {len(base)} conversations; extras: {len(extras)}", file=sys.stderr)
        for v in VARIANTS:
            print(f"variant_{v}: {N_BASE + round(N_BASE * v / 100)}", file=sys.stderr)
        for e in sorted(table):
            print(f"{e:18} {table[e]}", file=sys.stderr)
        clean = [i for i, c in enumerate(base) if sharegpt_ok(c)]
        print(f"{'sharegpt_valid':18} {clean}", file=sys.stderr)
        lens = [len(c["conversations"]) for c in base + extras]
        print(f"turns: min {min(lens)} max {max(lens)} total {sum(lens)}", file=sys.stderr)


if __name__ == "__main__":
    main()
